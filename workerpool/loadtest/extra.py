"""What the load test needs beyond workerpool's own dependencies: the ``loadtest`` extra,
``pip install 'workerpool[loadtest]'`` (hdrhistogram for the report, rich for the live
bar, matplotlib for ``--plot``).

They stay an extra because the hosts that serve (``up``, ``worker``) need none of them:
hdrhistogram ships a compiled module and requires pbr and setuptools at run time, and
matplotlib is large. Whatever lacks one says so in one line that names the extra.
"""

from __future__ import annotations

import importlib

INSTALL = "pip install 'workerpool[loadtest]'"


class MissingExtra(ImportError):
    """A module of the loadtest extra cannot be imported; the message says what to do."""


def require(module: str, package: str, needed_by: str, alternative: str | None = None,
            install: str = INSTALL) -> None:
    """Import ``module`` (of the distribution ``package``) or raise MissingExtra:
    "``needed_by`` needs ``package``, which is not installed: ``install``"."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        name = exc.name if isinstance(exc, ModuleNotFoundError) else None
        if name and (module == name or module.startswith(name + ".")):
            why = "which is not installed"
        else:  # installed but broken, e.g. hdrhistogram without its compiled module
            why = "which cannot be imported (" + " ".join(str(exc).split()) + ")"
        hint = f" (or {alternative})" if alternative else ""
        raise MissingExtra(f"{needed_by} needs {package}, {why}: {install}{hint}") from exc
