"""Handlers used only by tests (importable by workers as tests.handlers)."""

from __future__ import annotations

import os

from workerpool.handlers import Echo


class BadSetup(Echo):
    """setup() fails: the slot must be marked failed, never respawned in a loop."""

    def setup(self, ctx):
        raise FileNotFoundError("weights not found: /nonexistent/model.pt")


class Streams(Echo):
    """Streams that fail or crash midway."""

    def count_then_fail(self, payload):
        yield from range(int(payload["n"]))
        raise RuntimeError("stream broke")

    def count_then_crash(self, payload):
        yield from range(int(payload["n"]))
        os._exit(3)

    def unencodable(self, payload):
        return object()


class FailFirstSlot(Echo):
    """setup() fails in slot N/0 only: one failed worker among healthy ones."""

    def setup(self, ctx):
        if ctx.slot.endswith("/0"):
            raise FileNotFoundError(f"weights not found for {ctx.slot}")


class Big(Echo):
    def big(self, payload):
        return b"x" * int(payload["n"])
