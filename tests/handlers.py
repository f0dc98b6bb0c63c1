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
