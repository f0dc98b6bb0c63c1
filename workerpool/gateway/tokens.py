"""Bearer tokens (``--tokens FILE``): which ``Authorization`` headers the gateway accepts.

The file holds one token per line; blank lines and lines starting with ``#`` are skipped.
Tokens are kept as SHA-256 digests and a header's token is looked up by its digest, so
the comparison takes the same time whatever prefix of a valid token it shares. The file
is read again when it changes (checked at most every ``RELOAD_CHECK`` seconds): a token
deleted from it is refused from then on, and a file emptied or removed refuses every
token (revoking all must work). A file that cannot be read or holds a malformed token
(a write caught halfway) keeps the last good set.
"""

from __future__ import annotations

import hashlib
import logging
import os

log = logging.getLogger("workerpool.gateway")

RELOAD_CHECK = 2.0
"""Seconds between looks at the token file's modification time and size."""
MIN_LENGTH = 16
"""A token shorter than this is refused when the file is read: it could be guessed."""


class TokenFileError(ValueError):
    """The token file cannot be read, or holds no usable token."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def read_tokens(path: str, allow_none: bool = False) -> frozenset[bytes]:
    """The digests of the tokens in ``path``. Raises TokenFileError, and for a file with
    no token unless ``allow_none``."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"cannot read the token file {path}: {exc}") from None
    tokens = [t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#")]
    short = [i for i, t in enumerate(tokens) if len(t) < MIN_LENGTH or any(c.isspace() for c in t)]
    if short:
        raise TokenFileError(f"{path}: {len(short)} token(s) shorter than {MIN_LENGTH} "
                             "characters or with spaces in them")
    if not tokens and not allow_none:
        raise TokenFileError(f"{path} holds no token (one per line; # starts a comment)")
    return frozenset(_digest(t) for t in tokens)


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header; None for anything else."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class Tokens:
    """The allowed tokens of one file; ``allows`` takes the header and the loop's time."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._digests = read_tokens(path)
        self._seen = self._stamp()
        self._next_check = 0.0

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def allows(self, header: str | None, now: float) -> bool:
        """Whether ``header`` (an Authorization value) carries an allowed token."""
        if now >= self._next_check:
            self._next_check = now + RELOAD_CHECK
            self._maybe_reload()
        token = bearer(header)
        return token is not None and _digest(token) in self._digests

    def _maybe_reload(self) -> None:
        stamp = self._stamp()
        if stamp == self._seen:
            return
        self._seen = stamp
        if stamp is None:  # removed: as deliberate as emptying it
            self._digests = frozenset()
            log.warning("token file %s is gone: every request is refused (401)", self.path)
            return
        try:
            self._digests = read_tokens(self.path, allow_none=True)
        except TokenFileError as exc:  # keep the last good set: one bad edit locks no one out
            log.warning("token file not reloaded: %s", exc)
            return
        if self._digests:
            log.info("token file reloaded: %d tokens", len(self._digests))
        else:
            log.warning("token file %s holds no token: every request is refused (401)",
                        self.path)
