"""The package layers: nothing imports upward, and the router process stays small."""

from __future__ import annotations

import subprocess
import sys

import workerpool
from tests.conftest import ROOT


def _modules_after(statement: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{statement}; import sys; print('\\n'.join(sys.modules))"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    return set(out.stdout.split())


def test_router_loads_neither_client_nor_asyncio():
    loaded = _modules_after("import router.router")
    assert "workerpool.client" not in loaded
    assert "asyncio" not in loaded


def test_ipc_imports_nothing_above_it():
    loaded = _modules_after("import ipc, ipc.codec, ipc.lifecycle, ipc.transport, ipc.shm")
    above = sorted(m for m in loaded if m.split(".")[0] in ("workerpool", "router"))
    assert above == []


def test_every_public_name_is_exported_and_importable():
    for name in workerpool.__all__:
        assert getattr(workerpool, name) is not None
    assert "WorkerPoolError" in workerpool.__all__
    # Every error class is in the tree and exported from workerpool.errors.
    from workerpool import errors
    for name in errors.__all__:
        value = getattr(errors, name)
        if isinstance(value, type) and name != "RemoteTraceback":
            assert issubclass(value, errors.WorkerPoolError), name
