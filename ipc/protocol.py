"""The workerpool wire protocol: message kinds and the frame layout.

Every message, in every direction, is one ZeroMQ multipart message::

    [routing id...]              added/stripped by ROUTER sockets, never seen by codecs
    frame 0  head    header (20 bytes) | meta | body
             header  b"WP" | version u8 | kind u8 | request id u64 | meta length u32 |
                     body length u32 (all big-endian)
             meta    msgpack map (0 bytes = {})           small, read by the router
             body    msgpack value (0 bytes = nil)        opaque to the router
    frame 1  body    only when the body length is BODY_IN_FRAME: a large body travels in a
                     frame of its own, so that no peer copies it into the head
    then     buffers raw bytes referenced from the body by index (large arrays)

One frame for what most messages carry: every frame costs each peer a ZeroMQ call, and
with CURVE an encryption, so the small parts share one. The header is fixed-size so the
router can route on it without decoding msgpack; the body is forwarded byte-for-byte.
docs/protocol.md is the normative description.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

import msgpack

from ipc.errors import FrameError

MAGIC = b"WP"
VERSION = 4
HEADER = struct.Struct("!2sBBQII")
HEADER_SIZE = HEADER.size  # 20
_ID_PART = struct.Struct("!2sBBQ")  # the first 12 bytes: enough to answer under the id
_LENGTHS = struct.Struct("!II")  # the last 8: meta and body lengths
MAX_REQUEST_ID = 2**64 - 1
BODY_IN_FRAME = 0xFFFFFFFF
"""The body length that says: the body is frame 1, not in the head."""
BODY_FRAME_MIN = 65536
"""Bodies at least this large travel in a frame of their own: below it, copying the body
into the head costs less than a frame does; above it, the copy costs more."""


class Kind(enum.IntEnum):
    """Message kinds, one byte in the header. Values are grouped by sender."""

    # client -> router
    REQUEST = 0x01  # meta: {"service", "method", "timeout", ...}; body: payload
    CANCEL = 0x02  # forget a request (client -> router, and router -> worker, best effort)
    STATUS = 0x03  # answered with RESULT whose body is the health table
    ADMIN = 0x04  # operator command (meta: {"op", ...}); router -> supervisor too

    # replies: router -> client, and worker -> router (same layout both ways)
    RESULT = 0x10  # final reply; body: the value
    ERROR = 0x11  # final reply; body: {"type", "message", "retryable", "worker", ...}
    PARTIAL = 0x12  # one streamed item; body: the item
    END = 0x13  # final reply of a stream; body: nil

    # worker -> router
    READY = 0x20  # registration; meta: slot, incarnation, pid, device, service, capacity, methods
    GOODBYE = 0x21  # the worker is leaving on purpose (drain, shutdown)
    HEARTBEAT = 0x22  # liveness; the router answers with HEARTBEAT
    STARTED = 0x23  # meta: {"ids": [...]}: a batch of these requests started together

    # router -> worker
    SHUTDOWN = 0x30  # finish what you hold, send GOODBYE, exit
    RECLAIM = 0x31  # router -> worker: give this unstarted request back; worker -> router:
    #                 meta {"returned": bool}, whether it did (else it had started it)

    # supervisor <-> router
    HELLO = 0x40  # supervisor -> router: the slots and services it runs
    SLOT = 0x41  # supervisor -> router: a slot changed (started, died, failed)
    DRAIN = 0x42  # supervisor -> router: stop admitting, finish in-flight, then SHUTDOWN workers
    DRAINED = 0x43  # router -> supervisor: every admitted request has had its final reply

    # any peer -> any peer
    BUNDLE = 0x50  # id: how many messages; body: that many one-frame messages, end to end


FINAL_REPLY_KINDS = frozenset({Kind.RESULT, Kind.ERROR, Kind.END})
REPLY_KINDS = FINAL_REPLY_KINDS | {Kind.PARTIAL}
# A worker's heartbeat socket is named after its main socket plus this: the router takes a
# heartbeat ``of`` a worker only from that worker's own heartbeat socket.
HEARTBEAT_SUFFIX = b"#hb"
_KINDS = {k.value: k for k in Kind}
BUNDLE_MAX = 64
"""The most messages one BUNDLE may hold. A receiver handles a bundle's messages in one
go, while another peer's message waits behind them, so this bounds how long one message
can hold its loop (the router: about 2 ms for 64 requests); most of what a bundle saves
is saved by its first few dozen messages."""
BUNDLE_BYTES = BODY_FRAME_MIN
"""The most bytes a bundle's body may hold. Senders close a bundle before it passes this,
for the reason a body this large gets a frame of its own (past it, copying costs more than
a frame does); receivers refuse a larger one, so what decoding one bundle's metas can cost
is bounded by this, as for one meta (``META_BYTES_PER_CONTAINER``)."""


@dataclass(slots=True)
class Message:
    """One decoded message. ``body`` stays encoded: only its final receiver decodes it."""

    kind: Kind
    req_id: int
    meta: dict = field(default_factory=dict)
    body: bytes = b""
    buffers: list = field(default_factory=list)


def unpack_header(frame: bytes) -> tuple[Kind, int]:
    """The kind and request id of a head (frame 0), raising FrameError if its first 12
    bytes are not a header: what a peer needs to answer a message it cannot read."""
    if len(frame) < HEADER_SIZE:
        raise FrameError("bad-header", f"head frame is {len(frame)} bytes, shorter than the "
                         f"{HEADER_SIZE}-byte header")
    magic, version, kind, req_id = _ID_PART.unpack_from(frame)
    if magic != MAGIC:
        raise FrameError("bad-magic", f"header starts with {magic!r}, expected b'WP'")
    if version != VERSION:
        raise FrameError(
            "bad-version",
            f"protocol version {version} is not supported (this peer speaks {VERSION})",
            req_id,
        )
    k = _KINDS.get(kind)
    if k is None:
        raise FrameError("bad-kind", f"unknown message kind 0x{kind:02x}", req_id)
    return k, req_id


def pack_meta(meta: dict | None) -> bytes:
    return msgpack.packb(meta, use_bin_type=True) if meta else b""


MAX_META_BYTES = 655360
"""The default bound on a meta frame: above any real meta (a request's is tens of bytes, the
largest client ping 65,536 ids of at most 9 bytes)."""
META_CONTAINERS = 256
META_BYTES_PER_CONTAINER = 32
"""A meta may hold at most ``META_CONTAINERS`` maps and arrays, plus one per
``META_BYTES_PER_CONTAINER`` bytes of frame. Containers are what make decoding dear: an
empty array is 1 byte sent and 64 bytes decoded, an empty map 72, so a meta of nothing
else costs 64-72 times its size. Real metas hold a few (a ping's id list; a HELLO's map per
slot, 50 bytes or more each), so the bound never refuses one. With it, decoding costs at
most about 20 times the frame's size: what the cheapest scalars that Python does not share
(2-character strings, small negative ints, 2 or 3 bytes each) cost anyway."""
MAX_REQUEST_META_BYTES = 16384
"""The bound on the meta of a REQUEST, CANCEL, STATUS or ADMIN wherever a receiver bounds
metas (``MetaCache``): theirs are tens of bytes (a method, a service, a timeout), and only
a ping's list of held ids needs ``max_meta_bytes``. It keeps what one request's meta can
cost small: decoding it on the router and again on the worker, and holding it while the
request waits in a queue (at most 16 KiB instead of 640 KiB a record)."""
REQUEST_META_KINDS = frozenset({Kind.REQUEST, Kind.CANCEL, Kind.STATUS, Kind.ADMIN})
CACHED_META_BYTES = 256
"""Only meta frames this small are cached: real ones are, and the cache stays small
however many distinct metas a peer invents."""


class _TooManyContainers(Exception):
    pass


class _ContainerBudget:
    """msgpack's list and map hook: counts containers as they are built, and stops the
    decoding once there are too many, before most of them are."""

    __slots__ = ("left",)

    def __init__(self, left: int) -> None:
        self.left = left

    def take(self, obj: object) -> object:
        self.left -= 1
        if self.left < 0:
            raise _TooManyContainers
        return obj


def _no_ext(code: int, data: bytes) -> object:
    # No meta carries one; decoded, each would be a tuple and a bytes object (27x its size).
    raise _ExtInMeta(code)


class _ExtInMeta(Exception):
    pass


def max_meta_containers(size: int) -> int:
    """How many maps and arrays a meta frame of ``size`` bytes may hold."""
    return META_CONTAINERS + size // META_BYTES_PER_CONTAINER


def unpack_meta(frame: bytes, req_id: int | None = None,
                max_bytes: int | None = None) -> dict:
    """Decode a meta frame, at a cost in time and memory bounded by a small multiple of its
    size (``META_BYTES_PER_CONTAINER``). Raises FrameError for anything that is not a
    string-keyed map within the limits."""
    if not frame:
        return {}
    if max_bytes is not None and len(frame) > max_bytes:
        raise FrameError("meta-too-large",
                         f"meta frame is {len(frame)} bytes, over the limit of {max_bytes}", req_id)
    try:
        if len(frame) <= META_CONTAINERS:  # cannot hold more: spare small metas the hooks
            meta = msgpack.unpackb(frame, raw=False, strict_map_key=True, ext_hook=_no_ext)
        else:
            budget = _ContainerBudget(max_meta_containers(len(frame)))
            meta = msgpack.unpackb(frame, raw=False, strict_map_key=True, ext_hook=_no_ext,
                                   list_hook=budget.take, object_hook=budget.take)
    except _TooManyContainers:
        raise FrameError("bad-meta", f"meta frame holds over {max_meta_containers(len(frame))} "
                         f"maps and arrays (at most {META_CONTAINERS}, plus one per "
                         f"{META_BYTES_PER_CONTAINER} bytes)", req_id) from None
    except _ExtInMeta as exc:
        raise FrameError("bad-meta", f"meta frame holds msgpack extension type {exc.args[0]}; "
                         "metas carry none", req_id) from None
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise FrameError("bad-meta", f"meta frame is not msgpack: {exc}", req_id) from None
    if not isinstance(meta, dict):
        raise FrameError("bad-meta", f"meta frame is a {type(meta).__name__}, not a map", req_id)
    for key in meta:
        if not isinstance(key, str):
            raise FrameError("bad-meta", f"meta key {key!r:.40} is not a string", req_id)
    return meta


class MetaCache:
    """Decoded meta frames by their bytes. Requests for the same method and service carry
    byte-identical meta, so hot paths skip msgpack entirely. Returned maps are shared:
    callers must not mutate them. Bounded: at most ``size`` frames of at most
    ``CACHED_META_BYTES`` each (cleared when full); larger metas are decoded every time,
    and none larger than ``max_bytes``. A peer that invents distinct metas to fill it keeps
    at most about 6 KiB per entry here (a 256-byte frame decodes to at most ~20 times that,
    plus the frame): 3 MiB at the default size, where real traffic uses a few entries."""

    def __init__(self, size: int = 512, max_bytes: int | None = MAX_META_BYTES) -> None:
        self._size = size
        self.max_bytes = max_bytes
        self._maps: dict[bytes, dict] = {}

    def unpack(self, frame: bytes, req_id: int | None = None, kind: Kind | None = None) -> dict:
        """The meta of a message of ``kind`` (bounded by ``MAX_REQUEST_META_BYTES`` for the
        kinds that never need more)."""
        small = len(frame) <= CACHED_META_BYTES
        # Only a small frame is looked up: hashing one of 640 KiB would take 0.2 ms.
        meta = self._maps.get(frame) if small else None
        if meta is None:
            limit = self.max_bytes
            if limit is not None and kind in REQUEST_META_KINDS:
                limit = min(limit, MAX_REQUEST_META_BYTES)
            meta = unpack_meta(frame, req_id, limit)
            if small:
                if len(self._maps) >= self._size:
                    self._maps.clear()
                self._maps[bytes(frame)] = meta
        return meta


def encode(
    kind: Kind,
    req_id: int,
    meta: dict | bytes | None = None,
    body: bytes = b"",
    buffers: list | tuple = (),
) -> list:
    """Build the frames of one message. ``meta`` may be pre-packed bytes (hot paths)."""
    meta_frame = meta if isinstance(meta, bytes) else pack_meta(meta)
    if len(body) < BODY_FRAME_MIN:
        return [HEADER.pack(MAGIC, VERSION, kind, req_id, len(meta_frame), len(body))
                + meta_frame + body, *buffers]
    return [HEADER.pack(MAGIC, VERSION, kind, req_id, len(meta_frame), BODY_IN_FRAME)
            + meta_frame, body, *buffers]


def split(frames: list, at: int = 0) -> tuple[Kind, int, bytes, bytes, list]:
    """The kind, request id, meta frame, body and buffer frames of the message whose head
    is ``frames[at]`` (routing ids come before it). Checks the header and that its lengths
    match the frames; raises FrameError otherwise. Decodes no msgpack."""
    head = frames[at]
    kind, req_id = unpack_header(head)
    meta_len, body_len = _LENGTHS.unpack_from(head, 12)
    end = HEADER_SIZE + meta_len
    if body_len == BODY_IN_FRAME:
        if len(head) != end:
            raise FrameError("bad-length", f"head is {len(head)} bytes; its header says "
                             f"{end} (header and a {meta_len}-byte meta, body in frame 1)",
                             req_id)
        if len(frames) < at + 2:
            raise FrameError("too-few-frames", "the header puts the body in frame 1, and "
                             "the message has no frame 1", req_id)
        return kind, req_id, head[HEADER_SIZE:end], frames[at + 1], frames[at + 2:]
    if len(head) != end + body_len:
        raise FrameError("bad-length", f"head is {len(head)} bytes; its header says "
                         f"{end + body_len} (header, {meta_len}-byte meta, {body_len}-byte "
                         f"body)", req_id)
    if meta_len:
        return kind, req_id, head[HEADER_SIZE:end], head[end:], frames[at + 1:]
    return kind, req_id, b"", head[end:] if body_len else b"", frames[at + 1:]





def meta_length(head: bytes) -> int:
    """The meta length a head's header claims (0 for a head too short to say)."""
    return _LENGTHS.unpack_from(head, 12)[0] if len(head) >= HEADER_SIZE else 0


def decode(frames: list, cache: MetaCache | None = None) -> Message:
    """Decode a message (routing ids already stripped). Total: returns or raises FrameError."""
    kind, req_id, meta_frame, body, buffers = split(frames)
    meta = cache.unpack(meta_frame, req_id, kind) if cache is not None else \
        unpack_meta(meta_frame, req_id)
    return Message(kind, req_id, meta, body, buffers)


def pack(heads: list[bytes]) -> list[bytes]:
    """The heads of one-frame messages for one peer, as few messages as the bounds allow:
    each element is one frame to send as one message, a BUNDLE or a head alone (a lone
    message, or one of ``BUNDLE_BYTES`` or more, goes as itself). Order is kept."""
    if len(heads) == 1:
        return heads
    out: list[bytes] = []
    group: list[bytes] = []
    size = 0
    for head in heads:
        if len(head) >= BUNDLE_BYTES:
            _close(out, group)
            group, size = [], 0
            out.append(head)
            continue
        if len(group) == BUNDLE_MAX or size + len(head) > BUNDLE_BYTES:
            _close(out, group)
            group, size = [], 0
        group.append(head)
        size += len(head)
    _close(out, group)
    return out


def _close(out: list[bytes], group: list[bytes]) -> None:
    if len(group) == 1:
        out.append(group[0])
    elif group:
        body = b"".join(group)
        out.append(HEADER.pack(MAGIC, VERSION, Kind.BUNDLE, len(group), 0, len(body)) + body)


def unbundle(head: bytes) -> list[bytes]:
    """The messages in a BUNDLE's head (already checked by ``split``), in order, each a
    head of its own. All or nothing: raises FrameError ``bad-bundle`` (id 0) unless the
    count is 1 to BUNDLE_MAX and matches, the body is at most BUNDLE_BYTES, and every
    message is a whole one-frame message of another kind that ends where the next begins.
    Magic, version and kind of each are checked when it is handled, as for any message."""
    count = _ID_PART.unpack_from(head)[3]
    meta_len, body_len = _LENGTHS.unpack_from(head, 12)
    if not 1 <= count <= BUNDLE_MAX:
        raise FrameError("bad-bundle", f"a BUNDLE holds 1 to {BUNDLE_MAX} messages; its "
                         f"header says {count}")
    if meta_len:
        raise FrameError("bad-bundle", f"a BUNDLE has no meta; its header says {meta_len} "
                         "bytes")
    if body_len > BUNDLE_BYTES:
        raise FrameError("bad-bundle", f"a BUNDLE holds at most {BUNDLE_BYTES} bytes; its "
                         f"header says {body_len}")
    end = len(head)
    at = HEADER_SIZE
    out = []
    while at < end:
        if end - at < HEADER_SIZE:
            raise FrameError("bad-bundle", f"message {len(out) + 1} of the BUNDLE is "
                             f"{end - at} bytes, shorter than a header")
        kind = head[at + 3]
        inner_meta, inner_body = _LENGTHS.unpack_from(head, at + 12)
        if kind == Kind.BUNDLE or inner_body == BODY_IN_FRAME:
            raise FrameError("bad-bundle", f"message {len(out) + 1} of the BUNDLE is "
                             + ("a BUNDLE" if kind == Kind.BUNDLE else
                                "not a one-frame message (its body is in a frame of its own)"))
        stop = at + HEADER_SIZE + inner_meta + inner_body
        if stop > end:
            raise FrameError("bad-bundle", f"message {len(out) + 1} of the BUNDLE runs "
                             f"{stop - end} bytes past its end")
        if len(out) == count:
            break
        out.append(head[at:stop])
        at = stop
    if len(out) != count or at != end:
        raise FrameError("bad-bundle", f"the BUNDLE's header says {count} messages in "
                         f"{body_len} bytes; it holds {len(out)}"
                         + ("" if at == end else f" and {end - at} bytes more"))
    return out
