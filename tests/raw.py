"""A raw DEALER peer for tests that must see exact frames (counts, duplicates, garbage)."""

from __future__ import annotations

import struct
import time

import msgpack
import zmq

from ipc import protocol
from ipc.protocol import FINAL_REPLY_KINDS, Kind

ID_HEADER = struct.Struct("!2sBBQ")  # a header's first 12 bytes: magic, version, kind, id


def HDR(kind: int, rid: int, version: int = protocol.VERSION) -> bytes:
    """The first 12 bytes of a header; ``wire`` adds the lengths."""
    return ID_HEADER.pack(b"WP", version, kind, rid)


def wire(parts: list) -> list:
    """``[12 header bytes, meta, body, *buffers]`` as the message a peer sends: one head of
    header, lengths, meta and body, then the buffers, so that a test states the parts
    without building heads by hand. Fewer than 3 parts are sent as they are (malformed on
    purpose)."""
    if len(parts) < 3:
        return list(parts)
    header, meta, body, *buffers = parts
    return [header + struct.pack("!II", len(meta), len(body)) + meta + body, *buffers]


class RawPeer:
    def __init__(self, address: str, identity: bytes | None = None) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if identity:
            self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.connect(address)
        self.finals: dict[int, list] = {}  # request id -> final replies (must be exactly one)
        self.partials: dict[int, int] = {}
        self.received = 0  # messages on the wire: a BUNDLE counts once
        self._waiting: list[list] = []  # the rest of the last BUNDLE's messages

    def send(self, frames: list) -> None:
        self.sock.send_multipart(frames)

    def request(self, rid: int, method: str, payload=None, **meta) -> None:
        body = msgpack.packb(payload)
        self.send(protocol.encode(Kind.REQUEST, rid, {"method": method, **meta}, body))

    def recv(self, timeout: float = 5.0) -> list | None:
        """The next message, or None on silence; a BUNDLE's messages (protocol.md 2.6) come
        one at a time, each as if it had come alone."""
        if self._waiting:
            return self._waiting.pop(0)
        if not self.sock.poll(int(timeout * 1000)):
            return None
        frames = self.sock.recv_multipart()
        self.received += 1
        if len(frames[0]) >= protocol.HEADER_SIZE and frames[0][3] == Kind.BUNDLE:
            self._waiting = [[head] for head in protocol.unbundle(frames[0])]
            return self._waiting.pop(0)
        return frames

    def reply(self, timeout: float = 5.0) -> tuple[Kind, int, object]:
        """The next reply as (kind, id, decoded body); fails the test on silence."""
        frames = self.recv(timeout)
        assert frames is not None, f"no reply within {timeout}s"
        msg = protocol.decode(frames)
        body = msgpack.unpackb(msg.body) if msg.body else None
        return msg.kind, msg.req_id, body

    def collect(self, ids, timeout: float = 30.0, settle: float = 0.5) -> None:
        """Read until every id has a final reply, then ``settle`` seconds more for duplicates."""
        ids = set(ids)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not ids <= set(self.finals):
            self._take(0.1)
        end = time.monotonic() + settle
        while time.monotonic() < end:
            self._take(0.05)

    def _take(self, timeout: float) -> None:
        frames = self.recv(timeout)
        if frames is None:
            return
        msg = protocol.decode(frames)
        if msg.kind in FINAL_REPLY_KINDS:
            body = msgpack.unpackb(msg.body) if msg.body else None
            self.finals.setdefault(msg.req_id, []).append((msg.kind, body))
        elif msg.kind is Kind.PARTIAL:
            self.partials[msg.req_id] = self.partials.get(msg.req_id, 0) + 1

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()
