"""Hostile input against a live router, on both sockets, while a well-behaved client works.

::

    hypothesis: base messages + seed --mutations--> batches --> hostile DEALERs --+--> frontend
    hand-made: huge length prefixes, deep nesting, 1 and 10,000 frames,          +--> backend
               a 100 MB frame, 80 MiB in 8 MiB frames, worst-case metas, many connections,
               BUNDLEs: worst-case metas, nested, truncated, counts that do not match
    Watch: a Client calling echo all along; router RSS; worker pids and restarts

hypothesis draws the structure of each batch (frame counts, headers with every kind byte,
msgpack of every type valid and invalid for a meta or a body, bogus array headers); a
seeded PRNG then derives a dozen mutants of each message (bytes flipped, frames cut,
dropped, repeated), so that 100,000 messages fit in CI time. Runs are derandomized: CI
sends the same messages every time.

What a keyless pool accepts by design is left out: well-formed registrations on the
backend, ADMIN naming a real slot or service, and methods that occupy a worker on purpose
(``sleep``, ``count``). This fuzzes the router's decoding and validation, not its trust
(CURVE and roles close that door).

Asserted: every well-behaved call succeeds; the router's RSS afterwards is within 64 MiB
of before; no worker died, restarted or wedged (each answers afterwards); status answers;
no traceback in the pool's log. ``pytest -s`` prints the figures. The same batches also
go straight into ``RouterCore`` (no sockets), and a regression test holds the router's
loop to reading its backend while clients send costly metas.
"""

from __future__ import annotations

import itertools
import random
import threading
import time

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipc import protocol, shm
from ipc.errors import FrameError
from ipc.protocol import Kind
from tests.raw import HDR, ID_HEADER, wire
from workerpool import Client
from workerpool.config import RouterConfig

HANDLER = "workerpool.handlers:Echo"
WORKERS = 2
MAX_MESSAGE_BYTES = 64 * 2**20  # so that a 100 MB frame is over the router's limit
CONFIG = f"[router]\nmax_message_bytes = {MAX_MESSAGE_BYTES}\n"
RSS_SLACK_MIB = 64
EXAMPLES = 420  # batches: with BASE messages of MUTANTS + 1 variants each, >= 100,000 sent
BASE = 16
MUTANTS = 14

REGISTRATION = frozenset({Kind.READY, Kind.HELLO, Kind.SLOT, Kind.DRAIN, Kind.GOODBYE})
BUSY_METHODS = frozenset({"sleep", "count"})  # a client may occupy a worker with these by design
REAL_SLOTS = frozenset(f"default/{i}" for i in range(WORKERS))

# msgpack heads claiming ~4 GiB: str32, bin32, array32, map32, ext32.
HUGE_PREFIXES = (b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff",
                 b"\xdf\xff\xff\xff\xff", b"\xc9\xff\xff\xff\xff\x01")
DEEP_ARRAYS = b"\x91" * 10_000 + b"\xc0"
DEEP_MAPS = b"\x81\xa1a" * 10_000 + b"\xc0"
ECHO_META = protocol.pack_meta({"method": "echo"})
MOST_FRAMES = RouterConfig().max_buffer_frames  # the most buffer frames a message may have


# -- strategies ----------------------------------------------------------------------------
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(),
                     st.text(max_size=12), st.binary(max_size=12))
_values = st.recursive(
    _scalars | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12)),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=6) | st.integers(-9, 9), inner, max_size=5),
    max_leaves=10)
_field_values = st.one_of(
    _values, st.sampled_from(["echo", "whoami", "", "nope", "_private", "default", "x/0"]),
    st.floats(-1, 1e7), st.integers(-3, 2000),
    st.lists(st.integers(0, 2**64 - 1), max_size=8))  # a ping's "held"
_meta_maps = st.dictionaries(
    st.sampled_from(["method", "service", "timeout", "priority", "idempotent", "held", "op",
                     "worker", "workers", "shm", "slot", "incarnation", "ids", "of"])
    | st.text(max_size=6), _field_values, max_size=6)
_array_headers = st.dictionaries(
    st.sampled_from(["k", "dt", "sh", "n", "x", "b", "m"]),
    st.one_of(st.sampled_from(["numpy", "torch", "numpy-scalar", "<f8", "|u1", "<c16", "O"]),
              st.integers(-2**63, 2**64 - 1), st.lists(st.integers(-1, 2**40), max_size=4),
              st.binary(max_size=24), _scalars), max_size=7)
_bogus_arrays = _array_headers.map(
    lambda h: msgpack.packb(msgpack.ExtType(1, msgpack.packb(h, use_bin_type=True))))


def _packb(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


# ExtType takes codes 0-127 only; -128 to -1 are reserved (-1: timestamps), made by hand.
_negative_ext = st.builds(lambda code, data: b"\xc7" + bytes([len(data), code & 0xFF]) + data,
                          st.integers(-128, -1), st.sampled_from([b"", b"\x00" * 4, b"\x01" * 8,
                                                                 b"\xff" * 12, b"\x02"]))


_metas = st.one_of(st.just(b""), _meta_maps.map(_packb), _values.map(_packb),
                   st.binary(max_size=48), st.sampled_from(HUGE_PREFIXES),
                   st.sampled_from(HUGE_PREFIXES).map(lambda p: b"\x81\xa3pad" + p),
                   _negative_ext.map(lambda e: b"\x81\xa3pad" + e))
_bodies = st.one_of(st.just(b""), _values.map(_packb), st.binary(max_size=48), _bogus_arrays,
                    _negative_ext,
                    st.lists(_bogus_arrays, min_size=1, max_size=3).map(
                        lambda xs: bytes([0x90 | len(xs)]) + b"".join(xs)))
_headers = st.one_of(
    st.builds(lambda kind, rid: ID_HEADER.pack(b"WP", protocol.VERSION, kind, rid),
              st.sampled_from([k.value for k in Kind]) | st.integers(0, 255),
              st.sampled_from([0, 1, 2**64 - 1]) | st.integers(0, 2**64 - 1)),
    st.binary(min_size=12, max_size=12),  # bad magic and versions, mostly
    st.binary(max_size=16))
_random_messages = st.tuples(_headers, _metas, _bodies,
                             st.lists(st.binary(max_size=16), max_size=4),
                             st.integers(1, 7)).map(
    lambda t: wire([t[0], t[1], t[2], *t[3]][:t[4]]))
# Messages that get past decoding: they reach admission, the ADMIN and ping handlers, and
# (requests for echo) the worker's decoding of metas, bodies and array headers.
_plausible_messages = st.tuples(
    st.sampled_from([Kind.REQUEST, Kind.REQUEST, Kind.STATUS, Kind.CANCEL, Kind.ADMIN,
                     Kind.HEARTBEAT, Kind.STARTED]),
    st.integers(0, 2**64 - 1),
    st.fixed_dictionaries({"method": st.sampled_from(["echo", "echo", "whoami", "nope"])},
                          optional={"timeout": _field_values, "priority": _field_values,
                                    "service": _field_values, "idempotent": _field_values,
                                    "op": st.sampled_from(["restart", "drain", "scale", "x"]),
                                    "worker": _field_values, "workers": _field_values,
                                    "held": _field_values, "ids": _field_values,
                                    "shm": _field_values | st.just(shm.host_id())}),
    _bodies, st.lists(st.binary(max_size=16), max_size=3)).map(
    lambda t: wire([HDR(t[0], t[1]), _packb(t[2]), t[3], *t[4]]))
_messages = st.one_of(_random_messages, _plausible_messages)
_batches = st.tuples(st.lists(_messages, min_size=BASE, max_size=BASE),
                     st.integers(0, 2**32 - 1))


def _mutants(frames: list, rng: random.Random, n: int) -> list[list]:
    """``frames`` and ``n`` variants of it: a byte flipped, a frame cut, dropped, repeated or
    replaced, the kind byte or the id changed."""
    out = [frames]
    for _ in range(n):
        m = list(frames)
        op = rng.randrange(7)
        i = rng.randrange(len(m))
        if op == 0 and m[i]:
            b = bytearray(m[i])
            b[rng.randrange(len(b))] = rng.randrange(256)
            m[i] = bytes(b)
        elif op == 1:
            m[i] = m[i][:rng.randrange(len(m[i]) + 1)]
        elif op == 2 and len(m) > 1:
            del m[i]
        elif op == 3:
            m.insert(i, m[i])
        elif op == 4:
            m[i] = rng.randbytes(rng.randrange(32))
        elif op == 5 and len(m[0]) >= protocol.HEADER_SIZE:
            m[0] = m[0][:3] + bytes([rng.randrange(256)]) + m[0][4:]
        elif len(m[0]) >= protocol.HEADER_SIZE:
            m[0] = m[0][:4] + rng.randbytes(8) + m[0][12:]
        out.append(m)
    return out


def _meta_of(frames: list) -> tuple[Kind, dict] | None:
    """(kind, meta) if the router would read this message's header and meta, else None."""
    try:
        kind, _, meta, _, _ = protocol.split(frames)
        return kind, protocol.unpack_meta(meta, None, protocol.MAX_META_BYTES)
    except FrameError:
        return None


def _allowed_by_design(frames: list, backend: bool) -> bool:
    """Whether a pool without keys acts on this message on purpose: left out."""
    read = _meta_of(frames)
    if read is None:
        return False
    kind, meta = read
    if backend:
        return kind in REGISTRATION
    if kind is Kind.REQUEST:
        return str(meta.get("method")) in BUSY_METHODS
    if kind is Kind.ADMIN:
        return str(meta.get("worker")) in REAL_SLOTS or meta.get("service") == "default"
    return False


def _batch_messages(batch: tuple[list, int], mutants: int = MUTANTS):
    """(to the backend?, frames) for each message of one drawn batch."""
    messages, seed = batch
    rng = random.Random(seed)
    for j, base in enumerate(messages):
        backend = j % 3 == 2  # a third of them to the backend
        for frames in _mutants(base, rng, mutants):
            if not _allowed_by_design(frames, backend):
                yield backend, frames


# -- the pool and the watch ------------------------------------------------------------------
def _proc_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


class Watch:
    """A well-behaved client calling ``echo`` all along, and what the pool looked like
    before: the router's RSS, each worker's pid."""

    def __init__(self, pool) -> None:
        self.pool = pool
        st = pool.status()
        self.router_pid = st["router"]["pid"]
        self.backend = st["router"]["backend"]
        self.workers = {w["id"]: w["pid"] for w in st["workers"]}
        assert len(self.workers) == WORKERS
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="well-behaved", daemon=True)
        with Client(pool.address, timeout=30) as c:  # warm: the first calls set things up
            for i in range(50):
                assert c.call("echo", i) == i
        self.rss_before = _proc_kib(self.router_pid, "VmRSS")
        self._thread.start()

    def _run(self) -> None:
        i = 0
        with Client(self.pool.address, timeout=30) as c:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    got = c.call("echo", [i, "well-behaved"])
                    if got != [i, "well-behaved"]:
                        self.failures.append(f"call {i}: wrong answer {got!r:.80}")
                except Exception as exc:  # every failure is counted and reported
                    self.failures.append(f"call {i}: {exc!r:.200}")
                self.latencies.append(time.perf_counter() - t0)
                i += 1

    def check(self) -> None:
        assert not self.failures, self.failures[:5]

    def finish(self, sent: dict[str, int]) -> None:
        """Stop the well-behaved client, then check every invariant and print the figures."""
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive()
        peak = _proc_kib(self.router_pid, "VmHWM")
        with Client(self.pool.address, timeout=30) as c:
            st = c.status()
            seen: set[str] = set()
            deadline = time.monotonic() + 30
            while seen != set(self.workers) and time.monotonic() < deadline:
                futures = [c.submit("whoami") for _ in range(4 * WORKERS)]
                seen |= {f.result(30)["slot"] for f in futures}
        after = _proc_kib(self.router_pid, "VmRSS")
        lat = sorted(self.latencies)
        p50 = lat[len(lat) // 2] * 1000 if lat else float("nan")
        p99 = lat[int(len(lat) * 0.99)] * 1000 if lat else float("nan")
        print(f"\nfuzz: sent {sent}; well-behaved calls {len(lat)}, failed {len(self.failures)},"
              f" p50 {p50:.2f} ms, p99 {p99:.2f} ms; router RSS before {self.rss_before / 1024:.0f}"
              f" MiB, peak (VmHWM) {peak / 1024:.0f} MiB, after {after / 1024:.0f} MiB;"
              f" counters {st['router']['counters']}")
        log = self.pool.log.read_text(errors="replace")
        tracebacks = [i for i, line in enumerate(log.splitlines()) if "Traceback" in line]
        if tracebacks:
            print("pool log around its first traceback:\n" + "\n".join(
                log.splitlines()[max(0, tracebacks[0] - 5):tracebacks[0] + 30]))
        self.check()
        assert lat, "the well-behaved client made no call"
        assert "internal_errors" not in st["router"]["counters"], st["router"]["counters"]
        assert not tracebacks, f"{len(tracebacks)} tracebacks in the pool's log"
        assert (after - self.rss_before) / 1024 < RSS_SLACK_MIB, \
            f"router RSS {self.rss_before / 1024:.0f} -> {after / 1024:.0f} MiB"
        workers = {w["id"]: w for w in st["workers"]}
        assert {k: w["pid"] for k, w in workers.items()} == self.workers, "a worker was replaced"
        assert all(w["restarts"] == 0 and w["state"] in ("ready", "busy")
                   for w in workers.values()), workers
        assert seen == set(self.workers), f"workers that did not answer: {set(self.workers) - seen}"


class Hostile:
    """DEALER sockets on one router socket that send what they are given and read (and
    drop) whatever comes back, so that replies never pile up in the router."""

    def __init__(self, address: str, n: int) -> None:
        self.address = address
        self.ctx = zmq.Context()
        self.socks = [self._open() for _ in range(n)]
        self.sent = 0

    def _open(self) -> zmq.Socket:
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDTIMEO, 30_000)  # a router that stops reading fails the test
        s.connect(self.address)
        return s

    def send(self, frames: list, i: int = 0) -> None:
        self.socks[i % len(self.socks)].send_multipart(frames)
        self.sent += 1

    def reconnect(self, i: int) -> None:
        """A new connection in place of socket ``i`` (a new routing id to the router)."""
        i %= len(self.socks)
        self.socks[i].close(0)
        self.socks[i] = self._open()

    def drain(self, wait_ms: int = 0) -> int:
        """Read whatever has arrived, after waiting up to ``wait_ms`` for something."""
        if wait_ms:
            self._wait(wait_ms)
        n = 0
        for s in self.socks:
            while True:
                try:
                    s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                n += 1
        return n

    def _wait(self, wait_ms: int) -> None:
        poller = zmq.Poller()
        for s in self.socks:
            poller.register(s, zmq.POLLIN)
        poller.poll(wait_ms)

    def sync(self, backend: bool, timeout: float = 60.0) -> None:
        """Return once the router has handled everything sent so far: each socket sends a
        ping (a client's HEARTBEAT; a backend peer's ``ping``) and its answer comes after
        the answers to everything before it on that connection."""
        waiting = set()
        for i, s in enumerate(self.socks):
            token = 2**64 - 1 - i
            meta = {"ping": token} if backend else {}
            s.send_multipart(protocol.encode(Kind.HEARTBEAT, 0 if backend else token, meta))
            waiting.add((i, token))
        deadline = time.monotonic() + timeout
        while waiting:
            assert time.monotonic() < deadline, f"{len(waiting)} pings unanswered"
            for i, s in enumerate(self.socks):
                while True:
                    try:
                        frames = s.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    heads = protocol.unbundle(frames[0]) \
                        if protocol.unpack_header(frames[0])[0] is Kind.BUNDLE else [frames[0]]
                    for head in heads:  # the router may bundle its answers (2.6)
                        kind, rid, meta, _, _ = protocol.split([head])
                        if kind is Kind.HEARTBEAT:
                            token = protocol.unpack_meta(meta).get("pong") if backend else rid
                            waiting.discard((i, token))
            if waiting:
                self._wait(100)

    def close(self) -> None:
        for s in self.socks:
            s.close(0)
        self.ctx.term()


@pytest.fixture
def fuzz_pool(procs):
    return procs.pool("--config", procs.config(CONFIG), workers=WORKERS, handler=HANDLER)


# -- the tests ---------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_hypothesis_fuzz_on_both_sockets(fuzz_pool):
    watch = Watch(fuzz_pool)
    front = Hostile(fuzz_pool.address, 4)
    back = Hostile(watch.backend, 2)
    batches = [0]
    try:
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), print_blob=True)
        @given(_batches)
        def send_batch(batch):
            for j, (backend, frames) in enumerate(_batch_messages(batch)):
                (back if backend else front).send(frames, j // (MUTANTS + 1))
            batches[0] += 1
            if batches[0] % 50 == 0:
                front.reconnect(batches[0])
            front.drain()
            back.drain()
            watch.check()

        send_batch()
        front.sync(backend=False)
        back.sync(backend=True)
        total = front.sent + back.sent
        assert total >= 100_000, f"only {total} hostile messages were sent"
        watch.finish({"frontend": front.sent, "backend": back.sent})
    finally:
        front.close()
        back.close()


def _worst_metas(limit: int) -> list[bytes]:
    """Metas just under ``limit`` made of what costs most to decode."""
    n = limit - 64
    two_chars = [chr(97 + i % 26) + chr(97 + i // 26 % 26) for i in range(n // 3)]
    return [
        msgpack.packb({"method": "echo", "pad": [[] for _ in range(n)]})[:n],
        msgpack.packb({"method": "echo", "pad": [{} for _ in range(n)]})[:n],
        msgpack.packb({"method": "echo", "pad": two_chars}),
        msgpack.packb({"method": "echo", "pad": [-100] * (n // 2)}),
    ]


def _hand_made(backend: bool) -> list[list]:
    """One of each hand-made case; the 100 MB frame and many connections are done apart."""
    kinds = (Kind.HEARTBEAT, Kind.STARTED, Kind.RESULT) if backend else \
        (Kind.REQUEST, Kind.STATUS, Kind.HEARTBEAT, Kind.CANCEL, Kind.ADMIN)
    out: list[list] = [[b""], [HDR(Kind.REQUEST, 1)], [HDR(Kind.REQUEST, 2), b""]]
    rid = 10
    for kind in kinds:
        for prefix in HUGE_PREFIXES:
            out.append([HDR(kind, rid), prefix, b""])
            out.append([HDR(kind, rid + 1), b"\x81\xa3pad" + prefix, b""])
            out.append([HDR(kind, rid + 2), ECHO_META, prefix])
            rid += 3
        out.append([HDR(kind, rid), DEEP_ARRAYS, b""])
        out.append([HDR(kind, rid + 1), DEEP_MAPS, b""])
        out.append([HDR(kind, rid + 2), ECHO_META, DEEP_ARRAYS])
        out.append([HDR(kind, rid + 3), ECHO_META, DEEP_MAPS])
        out.append([HDR(kind, rid + 4), ECHO_META, msgpack.packb(None), *[b""] * 9_997])
        out.append([HDR(kind, rid + 5), ECHO_META, msgpack.packb([1]), *[b"x"] * MOST_FRAMES])
        rid += 6
    # A ping may carry a meta this large (its held ids); a request may not, and is refused
    # before its meta is decoded (MAX_REQUEST_META_BYTES).
    for i, meta in enumerate(_worst_metas(protocol.MAX_META_BYTES)):
        for kind in {kinds[0], Kind.HEARTBEAT}:
            for _ in range(5):
                out.append([HDR(kind, rid), meta, msgpack.packb(i)])
                rid += 1
    return [wire(m) for m in out] + _hand_made_bundles(kinds)


def _raw_bundle(count: int, heads: list[bytes]) -> bytes:
    """A BUNDLE saying ``count`` messages around ``heads``, whatever they are, at any size."""
    body = b"".join(heads)
    return protocol.HEADER.pack(b"WP", protocol.VERSION, Kind.BUNDLE, count, 0,
                                len(body)) + body


def _hand_made_bundles(kinds: tuple) -> list[list]:
    """BUNDLEs (protocol.md 2.6): worst-case request metas, as many as the 64 KiB bound lets
    be decoded and 64 of them (1 MiB, refused undecoded), nested, truncated, counts that do
    not match, and one with a frame after it."""
    metas = _worst_metas(protocol.MAX_REQUEST_META_BYTES)
    worst = [wire([HDR(kinds[i % len(kinds)], 100 + i), metas[i % len(metas)],
                   msgpack.packb(i)])[0] for i in range(protocol.BUNDLE_MAX)]
    small = [wire([HDR(kind, 500 + i), ECHO_META, msgpack.packb(i)])[0]
             for i, kind in enumerate(kinds)]
    whole = _raw_bundle(len(small), small)
    fits = [head for head, end in zip(worst, itertools.accumulate(map(len, worst)), strict=True)
            if end <= protocol.BUNDLE_BYTES]
    return [[frame] for frame in (
        _raw_bundle(len(fits), fits),
        _raw_bundle(len(worst), worst),
        _raw_bundle(2, [small[0], whole]),  # nested
        whole[:-1],  # truncated: shorter than its header says
        _raw_bundle(len(small), [*small[:-1], small[-1][:-1]]),  # its last message cut
        _raw_bundle(len(small) + 1, small),
        _raw_bundle(len(small) - 1, small),
        _raw_bundle(0, small),
        _raw_bundle(2**64 - 1, small),
        _raw_bundle(protocol.BUNDLE_MAX + 1, [small[0]] * (protocol.BUNDLE_MAX + 1)),
    )] + [[whole, b"a frame after a BUNDLE"]]


@pytest.mark.timeout(300)
def test_hand_made_hostile_messages_on_both_sockets(fuzz_pool):
    watch = Watch(fuzz_pool)
    front = Hostile(fuzz_pool.address, 2)
    back = Hostile(watch.backend, 2)
    try:
        for backend, side in ((False, front), (True, back)):
            for i, frames in enumerate(_hand_made(backend)):
                side.send(frames, i)
                if i % 8 == 7:
                    side.drain(0)
                    watch.check()
        # A 100 MB frame, over max_message_bytes: ZeroMQ drops that connection only.
        for side in (front, back):
            side.send(wire([HDR(Kind.HEARTBEAT, 5), b"", b"\x00" * 100_000_000]), 1)
            side.reconnect(1)
        # Frames each under the limit, over it together: refused whole (too-large).
        large = b"\x00" * (MAX_MESSAGE_BYTES // 8)
        for side in (front, back):
            side.send(wire([HDR(Kind.REQUEST if side is front else Kind.RESULT, 6), ECHO_META,
                            b"\xc0", *[large] * 10]))
        # Many connections, each leaving with its answers unread.
        many = Hostile(fuzz_pool.address, 200)
        try:
            for i in range(200):
                many.send(protocol.encode(Kind.REQUEST, 7, {"method": "echo"},
                                          msgpack.packb(i)), i)
                many.send(protocol.encode(Kind.HEARTBEAT, 8, {"held": [7, 9]}), i)
        finally:
            many.close()
        front.sync(backend=False)
        back.sync(backend=True)
        watch.check()
        with Client(fuzz_pool.address, timeout=30) as c:
            st = c.status()
        assert st["router"]["counters"]["bad_frames_frontend"] > 0
        assert st["router"]["counters"]["bad_frames_backend"] > 0
        watch.finish({"frontend": front.sent + many.sent, "backend": back.sent})
    finally:
        front.close()
        back.close()


def _inner(frames: list) -> list[bytes]:
    """A well-formed BUNDLE's messages; else the message's own head."""
    try:
        kind, *_ = protocol.split(frames)
        if kind is Kind.BUNDLE:
            return protocol.unbundle(frames[0])
    except FrameError:
        pass
    return [frames[0]]


def test_the_core_never_raises_on_hostile_messages():
    """The same messages straight into RouterCore (no sockets): an exception out of it would
    cost the router that message and its sender the reply. Every client message the core
    answers at once gets one reply, under its own id or 0."""
    from tests.router_harness import Harness, RecordingOutbox, Sent

    class Outbox(RecordingOutbox):
        """Records bodies the router forwards unread (a client's garbage) as their bytes."""

        def _decode(self, side: str, peer: bytes, frames: list) -> None:
            kind, req_id, meta, body, _ = protocol.split(frames)
            try:
                body = msgpack.unpackb(body) if body else None
            except Exception:  # any garbage a client sent: kept as its bytes
                pass
            self.sent.append(Sent(side, peer, kind, req_id, protocol.unpack_meta(meta), body))

    h = Harness(Outbox())
    h.hello(workers=2)
    workers = [h.ready("default/0"), h.ready("default/1")]

    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(_batches)
    def feed(batch):
        for j, (backend, frames) in enumerate(_batch_messages(batch, 4)):
            if backend:
                h.core.on_backend([b"rogue%d" % (j % 2), *frames])
                continue
            client = b"client%d" % (j % 3)
            before = len(h.out.sent)
            h.core.on_frontend([client, *frames])
            answers = [s for s in h.out.sent[before:] if s.side == "client"]
            # A well-formed BUNDLE is its messages, each answered as if alone (2.6).
            heads = _inner(frames)
            assert len(answers) <= len(heads), answers
            rids = {0} | {int.from_bytes(head[4:12], "big") for head in heads
                          if len(head) >= protocol.HEADER_SIZE}
            for answer in answers:
                assert answer.peer == client and answer.req_id in rids
        # The workers answer what they were sent, so the queue moves on.
        for _ in range(50):
            sent = [s for s in h.out.take() if s.side == "backend" and s.kind is Kind.REQUEST
                    and s.peer in workers]
            if not sent:
                break
            for s in sent:
                h.reply(s.peer, s.req_id, None)
        h.tick()

    feed()
    assert "internal_errors" not in h.core.stats
    assert sum(svc.completed for svc in h.core.services.values()) > 0
    assert h.core.stats["bad_frames_frontend"] > 0 and h.core.stats["bad_frames_backend"] > 0


def test_costly_client_messages_do_not_starve_the_backend(procs):
    """Pings just under max_meta_bytes each cost the router milliseconds to decode. Taken
    512 at a time before the backend was read again, 150 of them kept workers' heartbeats
    unread for seconds, and the router declared every worker hung and had it killed. The
    loop now turns to the other socket once a pass has taken long enough. From one
    connection, such pings beyond one per LARGE_META_INTERVAL are refused undecoded;
    here each of 150 connections sends one, and one connection sends 150."""
    pool = procs.pool("--config", procs.config(
        "[router]\nheartbeat_interval = 0.1\nheartbeat_liveness = 5\n"),
        workers=WORKERS, handler=HANDLER)
    watch = Watch(pool)
    many = Hostile(pool.address, 150)
    one = Hostile(pool.address, 1)
    meta = _worst_metas(protocol.MAX_META_BYTES)[2]  # 2-character strings: ~20x to decode
    try:
        for i in range(150):
            many.send(wire([HDR(Kind.HEARTBEAT, i + 1), meta, b""]), i)
            one.send(wire([HDR(Kind.HEARTBEAT, i + 1), meta, b""]))
        many.sync(backend=False)
        one.sync(backend=False)
        watch.finish({"frontend": many.sent + one.sent, "backend": 0})
    finally:
        many.close()
        one.close()
