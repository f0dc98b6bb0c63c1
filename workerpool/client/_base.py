"""The half of both clients that does no I/O: requests out, replies in, the router watch.

::

    submit(method, payload, ...)
      -> BaseClient._new_request -> rid, frames, Pending  -> the client sends the frames
           header + cached meta frame + codec body/buffer frames  (Replies.add the entry)
           (arrays lent from this client's shared-memory pool)
    frames of a reply (each message of a BUNDLE in turn, as if alone)
      -> BaseClient._take -> _parse_reply -> kind, rid, value or typed error -> Replies.apply
    (rid, frames) ready at the same moment
      -> batched: runs of one-frame messages as BUNDLEs, others alone  -> the client sends
    RouterWatch: ping frames out while requests are outstanding; a pong from a new
                 router instance -> the ids lost with the old one  -> Replies.fail

``BaseClient`` holds what ``Client`` and ``AsyncClient`` share: request ids, packed meta
frames, the shared-memory endpoint (a ``SegmentPool`` lending the requests' arrays, a
``SegmentMapper`` mapping the replies'), and turning a reply's frames into a value or a
typed error. The clients only move frames (the split of httpx's ``BaseClient``).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from typing import Any

import zmq

from ipc import codec, curve, protocol, transport
from ipc import shm as segments
from ipc.protocol import FrameError, Kind
from workerpool.client._replies import Pending, Replies
from workerpool.config import MAX_PRIORITY, MAX_TIMEOUT, MIN_PRIORITY, TIMINGS
from workerpool.errors import (
    PayloadError,
    PermissionDeniedError,
    ProtocolError,
    RouterRestartedError,
    from_wire,
)

MAX_PING_IDS = 65536  # request ids one ping asks the router about
_PONG_PREFIX = protocol.MAGIC + bytes([protocol.VERSION, Kind.HEARTBEAT])
_BUNDLE_PREFIX = protocol.MAGIC + bytes([protocol.VERSION, Kind.BUNDLE])
_META_CACHE_SIZE = 256  # distinct (method, service, timeout, priority, idempotent) kept packed
#: What the socket monitor of a client with keys reports (see ``HandshakeWatch``).
HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_SUCCEEDED)


def is_local(address: str) -> bool:
    """Whether a router at ``address`` runs on this host (ipc://, inproc://, loopback tcp)."""
    return transport.is_loopback(address)


class BaseClient:
    """I/O-free half of both clients: ids, request frames, shared memory, reply values.
    The arguments are ``Client``'s."""

    def __init__(self, address: str, *, timeout: float | None, max_message_bytes: int,
                 shm: bool | None, shm_pool_bytes: int, key: str | None = None,
                 router_key: str | None = None, keys: str | None = None,
                 role: str = "client") -> None:
        self.address = address
        # CURVE credentials (docs/security.md), read before any socket exists: a bad
        # path fails the constructor, not the first request.
        self._curve = curve.peer_keys(key=key, router_key=router_key, keys=keys, role=role)
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self._ids = itertools.count(1)
        use_shm = is_local(address) if shm is None else shm
        #: This host's shared-memory identity, sent as meta "shm" on every request: workers
        #: on the same host answer with segments. None: shared memory is not used.
        self.shm_host = segments.host_id() if use_shm else None
        self._shm = segments.ShmEndpoint(shm_pool_bytes) if self.shm_host else None
        self._pool = self._shm.pool if self._shm else None  # lends the requests' arrays
        self._mapper = self._shm.mapper if self._shm else None  # maps the replies' arrays
        # Services that answered "shm-unreachable" (a worker on another host): their
        # requests carry arrays in frames from then on. Replies still use shm when they can.
        self._frames_only: set[str | None] = set()
        self._metas: dict[tuple, bytes] = {}  # see _meta_frame
        self._replies = Replies(self._pool)
        self._watch = RouterWatch()
        self._handshake = HandshakeWatch(address)

    # -- requests ---------------------------------------------------------------------------
    def _new_request(self, future: Any, put: Any, method: str, payload: Any,
                     service: str | None, priority: int, timeout: float | None,
                     idempotent: bool | None) -> tuple[int, list, Pending]:
        """A request's id, its frames, and its entry for ``Replies`` (replies going to
        ``future``, or to ``put`` for a stream). The one request path of both clients.

        Its local deadline is ``TIMINGS.local_grace`` after ``timeout``: the router's own
        RequestTimeoutError ("in the queue" / "on worker X") normally comes first, and this
        one only when the router is gone or stalled.
        """
        if timeout is None:
            timeout = self.timeout
        rid, frames = self._request_frames(method, payload, service, priority, timeout,
                                           idempotent)
        deadline = None if timeout is None else time.monotonic() + timeout + TIMINGS.local_grace
        entry = Pending(future, put, deadline)
        if self._pool is not None and self._pool.has(rid):
            # Kept to send again in frames if the worker cannot map our segments.
            entry.request = (method, payload, service, priority, timeout, idempotent)
        return rid, frames, entry

    def _control(self, kind: Kind, meta: dict | None, future: Any,
                 timeout: float) -> tuple[int, list, Pending]:
        """A STATUS or ADMIN request: id, frames, and an entry that fails at ``timeout``."""
        rid = next(self._ids)
        return rid, protocol.encode(kind, rid, meta), Pending(future, None,
                                                              time.monotonic() + timeout)

    def _request_frames(self, method: str, payload: Any, service: str | None, priority: int,
                        timeout: float | None, idempotent: bool | None = None,
                        rid: int | None = None) -> tuple[int, list]:
        if not isinstance(method, str) or not method:
            raise ValueError("method must be a non-empty string")
        if timeout is not None and not 0 < timeout <= MAX_TIMEOUT:
            raise ValueError(f"timeout must be in (0, {MAX_TIMEOUT}] seconds, got {timeout!r}")
        if (isinstance(priority, bool) or not isinstance(priority, int)
                or not MIN_PRIORITY <= priority <= MAX_PRIORITY):
            raise ValueError(f"priority must be an integer in [{MIN_PRIORITY}, {MAX_PRIORITY}], "
                             f"got {priority!r}")
        if rid is None:
            rid = next(self._ids)
        self._trim_shm()
        pool = self._pool if service not in self._frames_only else None
        try:
            body, buffers = codec.dumps(payload, pool=pool, tag=rid,
                                        max_bytes=self.max_message_bytes)
        except codec.PayloadError as exc:
            if exc.code == codec.TOO_LARGE:
                raise PayloadError(f"request is {exc}") from None
            raise PayloadError(f"payload cannot be sent: {exc}") from None
        meta = self._meta_frame(method, service, timeout, priority, idempotent)
        size = protocol.HEADER_SIZE + len(meta) + len(body)
        if buffers:
            size += sum(len(b) for b in buffers)
        if size > self.max_message_bytes:
            self._finished(rid)
            raise PayloadError(f"request is {size} bytes, over max_message_bytes="
                               f"{self.max_message_bytes}")
        return rid, protocol.encode(Kind.REQUEST, rid, meta, body, buffers)

    def _meta_frame(self, method: str, service: str | None, timeout: float | None,
                    priority: int, idempotent: bool | None) -> bytes:
        """The packed meta frame. A caller sends the same few combinations over and over,
        so each is packed once (bounded like ``protocol.MetaCache``)."""
        key: tuple | None = (method, service, timeout, priority, idempotent)
        try:
            frame = self._metas.get(key)
        except TypeError:  # an unhashable service: sent as given, for the router to refuse
            frame = key = None
        if frame is None:
            meta: dict[str, Any] = {"method": method}
            if self.shm_host is not None:
                meta["shm"] = self.shm_host
            if service is not None:
                meta["service"] = service
            if timeout is not None:
                meta["timeout"] = float(timeout)
            if priority:
                meta["priority"] = priority
            if idempotent is not None:
                meta["idempotent"] = bool(idempotent)
            frame = protocol.pack_meta(meta)
            if key is not None:
                if len(self._metas) >= _META_CACHE_SIZE:
                    self._metas.clear()
                self._metas[key] = frame
        return frame

    def _resend_frames(self, rid: int, request: tuple) -> list | None:
        """The request again with its arrays in frames, after its worker said it cannot map
        our segments (it runs on another host); that service gets frames from now on. Same
        id: the router has answered the first one. None: it cannot be encoded again."""
        self._frames_only.add(request[2])
        self._finished(rid)
        try:
            return self._request_frames(*request, rid=rid)[1]
        except (PayloadError, ValueError):
            return None

    # -- shared memory ----------------------------------------------------------------------
    def _finished(self, rid: int) -> None:
        """Request ``rid`` was refused before it was sent: its segments may be reused.
        (Once sent, ``Replies`` does this on its final reply or when it is given up.)"""
        if self._pool is not None:
            self._pool.finish(rid)

    def _trim_shm(self) -> None:
        """At most once a second: give back idle segments and stale mappings."""
        if self._shm is not None:
            self._shm.maybe_trim()

    def _close_shm(self) -> None:
        if self._shm is not None:
            self._shm.close()

    # -- sending ----------------------------------------------------------------------------
    def _send_batched(self, items: list[tuple[int, list]],
                      put: Callable[[list], bool]) -> None:
        """Send ``items`` (see ``batched``) with ``put``, which returns False when there is
        no connection to send on (keys): the requests that message carried fail then."""
        for frames, rids in batched(items):
            if not put(frames):
                for rid in rids:
                    self._replies.fail(rid, self._handshake.refused
                                       or self._handshake.unsendable())

    def _send_again(self, rid: int, frames: list) -> None:
        """Send request ``rid`` again (``_resend_frames``); each client sends its own way."""
        raise NotImplementedError

    # -- replies ----------------------------------------------------------------------------
    def _take(self, frames: list) -> int:
        """Handle one message from the router, a BUNDLE's messages in order, each exactly
        as if it had arrived alone; returns how many that was. A malformed bundle is
        dropped whole, as a reply that cannot be attributed to a request is."""
        head = frames[0]
        if head[:4] != _BUNDLE_PREFIX:
            self._take_one(frames)
            return 1
        try:
            protocol.split(frames)  # the bundle's own header and length
            heads = protocol.unbundle(head)
        except FrameError:
            self._replies.malformed += 1
            return 1
        for head in heads:
            self._take_one([head])
        return len(heads)

    def _take_one(self, frames: list) -> None:
        replies, watch = self._replies, self._watch
        if (pong := watch.pong_body(frames)) is not None:
            for rid in watch.lost(pong, time.monotonic()):
                replies.fail(rid, router_restarted())
            return
        try:
            kind, rid, value, meta = self._parse_reply(frames)
        except FrameError as exc:
            replies.malformed += 1
            if exc.req_id:  # its request would otherwise wait out its timeout
                replies.fail(exc.req_id, ProtocolError(
                    f"malformed reply from the router: {exc}", code=exc.code))
            return
        request = replies.apply(kind, rid, value, meta)
        if request is not None:  # its worker cannot map our segments: send it in frames
            again = self._resend_frames(rid, request)
            if again is None:
                replies.apply(kind, rid, value, meta)
            else:
                self._send_again(rid, again)

    def _parse_reply(self, frames: list) -> tuple[Kind, int, Any, bytes]:
        """(kind, request id, value-or-error, meta frame). Raises FrameError on a malformed
        reply."""
        kind, rid, meta, body, buffers = protocol.split(frames)
        if kind not in protocol.REPLY_KINDS:
            raise FrameError("bad-kind", f"unexpected {kind.name} from router", rid)
        if kind is Kind.ERROR:
            try:
                err = codec.loads(body, buffers)
            except codec.PayloadError as exc:
                return kind, rid, ProtocolError(f"undecodable error reply: {exc}"), meta
            return kind, rid, from_wire(err), meta
        try:
            return kind, rid, codec.loads(body, buffers, mapper=self._mapper,
                                          max_bytes=self.max_message_bytes), meta
        except codec.PayloadError as exc:
            return Kind.ERROR, rid, PayloadError(f"undecodable reply: {exc}"), meta


def batched(items: list[tuple[int, list]]) -> list[tuple[list, list[int]]]:
    """The messages to send for ``items``, the ``(request id, frames)`` of messages ready
    at the same moment, in order (id 0: no request fails if it cannot be sent, as for a
    CANCEL or a ping): each run of one-frame messages packed into as few as the bounds
    allow (``protocol.pack``), a message of more frames alone between them, so the order
    never changes. Each comes with the ids of the requests it carries."""
    out: list[tuple[list, list[int]]] = []
    heads: list[bytes] = []
    rids: list[int] = []
    for rid, frames in items:
        if len(frames) == 1:
            heads.append(frames[0])
            rids.append(rid)
            continue
        _pack_into(out, heads, rids)
        heads, rids = [], []
        out.append((frames, [rid] if rid else []))
    _pack_into(out, heads, rids)
    return out


def _pack_into(out: list, heads: list[bytes], rids: list[int]) -> None:
    at = 0
    for message in protocol.pack(heads):
        n = protocol.unpack_header(message)[1] if message[3] == Kind.BUNDLE else 1
        out.append(([message], [rid for rid in rids[at:at + n] if rid]))
        at += n


class HandshakeWatch:
    """Whether the router refused this client's key, from its socket monitor's events.

    A refused handshake means nothing sent will ever be answered: the client fails what
    is outstanding with PermissionDeniedError at once, and each new request too, until a
    handshake succeeds (ZeroMQ keeps reconnecting; the key may be added meanwhile).

    The router closes a refused connection at once, so the client often sees only that
    its handshake failed, without the reason (over ipc:// nearly always): such a failure
    counts as a refusal until a first handshake has succeeded, and not after (then it
    is more likely a router going away mid-handshake, which the RouterWatch handles)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.refused: PermissionDeniedError | None = None
        self._succeeded = False

    def on_event(self, event: int) -> PermissionDeniedError | None:
        """The error to fail outstanding requests with, if ``event`` is a refusal."""
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.refused = None
            self._succeeded = True
            return None
        if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and self._succeeded:
            return None
        why = "refused this client's key (unknown or revoked)" \
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH else \
            "refused this client's handshake (an unknown or revoked key, a router without " \
            "keys, or the wrong router key)"
        self.refused = PermissionDeniedError(f"the router at {self.address} {why}",
                                             code="handshake")
        return self.refused

    def unsendable(self) -> PermissionDeniedError:
        """A request with no connection to go on: the refusal not reported yet."""
        return PermissionDeniedError(f"no connection to the router at {self.address}: its "
                                     "handshake failed (an unknown or revoked key?)",
                                     code="handshake")


class RouterWatch:
    """Notices a router restart: while requests are outstanding the client pings the
    router, whose answer names its process instance. A new name means the old router and
    every request it held are gone: those requests fail with RouterRestartedError instead
    of waiting for their timeouts (or forever)."""

    def __init__(self) -> None:
        self.instance: str | None = None
        self.next_ping = 0.0
        self.first_ping_at: float | None = None  # monotonic time of the first ping sent

    def due(self, now: float) -> bool:
        """Whether to ping now (the caller has requests outstanding): at most once a
        ``TIMINGS.ping_interval``. The first ping goes with the first request, so the
        router is named early."""
        if now < self.next_ping:
            return False
        self.next_ping = now + TIMINGS.ping_interval
        if self.first_ping_at is None:
            self.first_ping_at = now
        return True

    @staticmethod
    def ping(held: Iterable[int]) -> list:
        """The HEARTBEAT asking the router which of ``held`` it does not know."""
        return protocol.encode(Kind.HEARTBEAT, 0, {"held": list(itertools.islice(held,
                                                                                  MAX_PING_IDS))})

    @staticmethod
    def pong_body(frames: list) -> bytes | None:
        """The body of a pong (the router's HEARTBEAT answer); None for any other message."""
        if frames[0][:4] != _PONG_PREFIX:
            return None
        try:
            return protocol.split(frames)[3]
        except FrameError:
            return b""  # a pong all the same: nothing to learn from it

    def lost(self, body: bytes, now: float) -> list[int]:
        """From a pong: the request ids lost with an old router (none if it is the same)."""
        try:
            info = codec.loads(body)
            instance = str(info["router"])
            unknown = [int(r) for r in info.get("unknown", ())]
            uptime = float(info.get("uptime", float("inf")))
        except (codec.PayloadError, KeyError, TypeError, ValueError):
            return []
        if self.instance is None:
            # The first pong. If the router answering it started after our first ping was
            # sent, the router our first requests went to died before it answered: what
            # this one does not hold was lost with it.
            changed = self.first_ping_at is not None and uptime < now - self.first_ping_at
        else:
            changed = instance != self.instance
        self.instance = instance
        # The router lists the requests of the ping that it does not hold. Replies travel
        # ahead of the pong, so one still pending here was lost with the old router; one
        # that reached the new router (queued in our socket while it was down) is held
        # there and keeps waiting for its real reply.
        return unknown if changed else []


def router_restarted() -> RouterRestartedError:
    return RouterRestartedError("the router restarted while it held this request; it was "
                                "lost with it and can be sent again")
