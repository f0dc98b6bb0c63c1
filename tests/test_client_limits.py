"""Limits on one client connection, through the router's core with a fake clock: fair turns
in a service's queue, the in-flight limit, a client that is gone and one that does not read
its replies (router.clients, router.queue)."""

from __future__ import annotations

from ipc.errors import BackpressureError, from_wire
from ipc.protocol import Kind
from router.requests import Phase, Record
from router.service import Service, ServiceSettings
from tests.router_harness import Harness

SETTINGS = ServiceSettings("least-loaded", 100_000, 1, "queue", None)
A, B, C = b"client-a", b"client-b", b"client-c"


def _rec(rid: int, client: bytes, priority: int = 0) -> Record:
    return Record(rid, client, rid, "default", "echo", b"", b"", [], None, 0.0, priority)


def _drain(svc: Service) -> list[int]:
    out = []
    while (rec := svc.queue.pop()) is not None:
        out.append(rec.rid)
    return out


def _ready_pool(workers: int = 1, capacity: int = 1, **config: object) -> tuple[Harness, list]:
    h = Harness(**config)
    h.hello(workers=workers, max_inflight=capacity)
    return h, [h.ready(f"default/{i}", capacity=capacity) for i in range(workers)]


# -- the queue: clients take turns within a priority -------------------------------------------
def test_clients_take_turns_within_a_priority():
    svc = Service("default", SETTINGS)
    for rid in range(1, 101):
        svc.queue.push(_rec(rid, A))
    svc.queue.push(_rec(101, B))
    svc.queue.push(_rec(102, C))
    svc.queue.push(_rec(103, B))
    assert _drain(svc)[:6] == [1, 101, 102, 2, 103, 3]
    assert svc.queued == 0


def test_priority_comes_before_turns_and_fifo_holds_per_client():
    svc = Service("default", SETTINGS)
    for rid, client, prio in [(1, A, 0), (2, A, 0), (3, B, 5), (4, A, 5), (5, B, 5), (6, C, 0)]:
        svc.queue.push(_rec(rid, client, prio))
    assert _drain(svc) == [3, 4, 5, 1, 6, 2]


def test_a_request_back_from_a_dead_worker_goes_first_for_its_client():
    svc = Service("default", SETTINGS)
    for rid in (2, 3):
        svc.queue.push(_rec(rid, A))
    svc.queue.push(_rec(4, B))
    again = _rec(1, C)
    svc.queue.push(again, front=True)  # was dispatched first, its worker died
    older = _rec(0, A)
    svc.queue.push(older, front=True)  # A already waits: it keeps A's turn, first within A
    assert _drain(svc) == [1, 0, 4, 2, 3]


def test_queue_entries_stay_bounded_when_many_clients_leave_requests_behind():
    svc = Service("default", SETTINGS)
    rid = 0
    for i in range(2000):
        client = b"c%d" % i
        for _ in range(1 if i % 2 else 5):
            rid += 1
            rec = _rec(rid, client)
            svc.queue.push(rec)
            if not i % 2:
                rec.phase = Phase.DONE  # its client left: finished in place
                svc.queue.forget()
    assert svc.queued == 1000
    assert svc.queue._entries <= 2 * 1000 + 64 + 1
    assert svc.queue.clients() <= 2 * 1000 + 64 + 1
    assert len(_drain(svc)) == 1000 and svc.queue._entries == 0


# -- dispatch: one client's backlog does not hold another up -----------------------------------
def test_a_flooders_backlog_delays_another_client_by_one_request():
    h, [w] = _ready_pool()
    for i in range(1, 51):
        h.request(A, i)
    h.request(B, 1)
    clients = []
    for n in range(3):
        rid = h.dispatched_to(w)[n]
        clients.append(h.core.requests.records[rid].client)
        h.reply(w, rid)
    # A's first was running; A's turn in the queue came before B's, then B's.
    assert clients == [A, A, B]


# -- the in-flight limit -----------------------------------------------------------------------
def test_a_client_over_its_inflight_limit_gets_a_client_limit_error_others_do_not():
    h, [w] = _ready_pool(max_client_inflight=3)
    for i in range(1, 5):
        h.request(A, i)
    [err] = h.out.errors_to(A)
    assert isinstance(err, BackpressureError) and err.code == "client-limit"
    assert err.retryable and err.retry_after > 0
    assert "max_client_inflight" in str(err)
    h.request(B, 1)
    assert not h.out.errors_to(B)
    assert h.core.stats["refused_client_limit"] == 1
    # One answered: A may send one more.
    h.reply(w, h.dispatched_to(w)[0])
    h.out.take()
    h.request(A, 5)
    assert not h.out.errors_to(A)


def test_the_service_being_full_has_its_own_code():
    h, _ = _ready_pool()
    h.core.services["default"].configure(ServiceSettings("least-loaded", 1, 1, "queue", None))
    h.request(A, 1)  # runs
    h.request(A, 2)  # queued
    h.request(B, 1)  # queue full
    [err] = h.out.errors_to(B)
    assert isinstance(err, BackpressureError) and err.code == "service-full"


def test_backpressure_code_round_trips():
    err = from_wire(BackpressureError("x", code="client-limit", retry_after=0.5).to_wire())
    assert isinstance(err, BackpressureError)
    assert (err.code, err.retry_after, err.retryable) == ("client-limit", 0.5, True)


# -- a client that is gone ---------------------------------------------------------------------
def test_a_gone_client_has_its_queued_requests_dropped_and_running_ones_cancelled():
    h, [w] = _ready_pool(capacity=2)
    for i in range(1, 11):
        h.request(A, i)
    h.request(B, 1)
    first, second = h.dispatched_to(w)
    h.out.unreachable.add(A)  # A disconnected
    h.out.take()
    h.reply(w, first)  # its reply is unroutable: A is gone
    svc = h.core.services["default"]
    assert svc.queued == 0
    assert A not in h.core.requests.per_client
    # Its other running request is cancelled on the worker, and the freed capacity goes
    # to B at once instead of to A's backlog.
    sent = h.out.take()
    assert [(s.kind, s.req_id) for s in sent if s.kind is Kind.CANCEL] == [(Kind.CANCEL, second)]
    [to_b] = [s.req_id for s in sent if s.kind is Kind.REQUEST]
    assert h.core.requests.records[to_b].client == B
    stats = h.core.stats
    assert (stats["clients_gone"], stats["dropped_queued"], stats["dropped_running"]) == (1, 8, 1)
    # The cancelled one's late reply is dropped; nothing is left of A.
    h.reply(w, second)
    assert not [r for r in h.core.requests.records.values() if r.client == A]


# -- a client that does not read its replies ---------------------------------------------------
def test_a_client_that_does_not_read_is_cut_off_then_let_back():
    # Short enough that no worker or supervisor needs a heartbeat meanwhile.
    h, [w] = _ready_pool(capacity=2, slow_client_cutoff=2.0)
    for i in range(1, 6):
        h.request(A, i)
    h.request(B, 1)
    first, second = h.dispatched_to(w)
    h.out.not_reading.add(A)  # its send queue is at max_unread_replies
    h.out.take()
    h.reply(w, first)
    svc = h.core.services["default"]
    assert svc.queued == 0 and A not in h.core.requests.per_client
    assert h.core.release_memory
    sent = h.out.take()
    assert [s.req_id for s in sent if s.kind is Kind.CANCEL] == [second]
    [to_b] = [s.req_id for s in sent if s.kind is Kind.REQUEST]
    assert h.core.requests.records[to_b].client == B
    st = h.core.status()["router"]
    assert st["clients_cut_off"] == 1 and st["counters"]["clients_cut_off"] == 1
    # It reads again, but for slow_client_cutoff its requests are refused.
    h.out.not_reading.discard(A)
    h.tick(1.0)
    h.request(A, 6)
    [err] = h.out.errors_to(A)
    assert isinstance(err, BackpressureError) and err.code == "not-reading"
    assert 0 < err.retry_after <= 1.0 and "max_unread_replies" in str(err)
    assert h.core.stats["refused_not_reading"] == 1
    # Other clients are served meanwhile.
    h.out.take()
    h.request(B, 2)
    assert not h.out.errors_to(B)
    h.tick(1.0)
    assert h.core.status()["router"]["clients_cut_off"] == 0
    h.out.take()
    h.request(A, 7)
    assert not h.out.errors_to(A)


def test_a_stream_faster_than_its_reader_ends_and_the_connection_stays():
    """A PARTIAL meeting a full queue ends that stream: its worker is told to stop, its
    final ERROR (stream-overrun) goes out once the queue has room, and the connection is
    not cut off: it reads, only slower than the stream."""
    h, [w] = _ready_pool(capacity=2)
    h.request(A, 1)
    h.request(A, 2)
    stream, other = h.dispatched_to(w)
    h.out.take()
    h.backend(w, Kind.PARTIAL, req_id=stream, body=b"\x00")
    assert [s.kind for s in h.out.take()] == [Kind.PARTIAL]
    h.out.not_reading.add(A)  # max_unread_replies wait for it
    h.backend(w, Kind.PARTIAL, req_id=stream, body=b"\x01")
    assert [(s.kind, s.req_id) for s in h.out.take()] == [(Kind.CANCEL, stream)]
    assert h.core.stats["streams_overrun"] == 1 and "clients_cut_off" not in h.core.stats
    h.backend(w, Kind.PARTIAL, req_id=stream, body=b"\x02")  # on its way before the CANCEL
    h.tick(0.1)
    assert not h.out.take()  # still full: the ERROR waits, the late item is dropped
    h.out.not_reading.discard(A)
    h.tick(0.1)
    [err] = h.out.errors_to(A)
    assert isinstance(err, BackpressureError) and err.code == "stream-overrun"
    assert h.out.to(A)[0].req_id == 1 and not h.core.clients.owed
    # The connection is served as before: its other request, and new ones.
    h.out.take()
    h.reply(w, other)
    h.request(A, 3)
    assert [s.req_id for s in h.out.to(A)] == [2] and not h.out.errors_to(A)
    assert h.dispatched_to(w)


def test_an_owed_stream_error_is_forgotten_when_its_client_leaves():
    h, [w] = _ready_pool()
    h.request(A, 1)
    [stream] = h.dispatched_to(w)
    h.out.not_reading.add(A)
    h.backend(w, Kind.PARTIAL, req_id=stream, body=b"\x00")
    assert h.core.clients.owed
    h.out.not_reading.discard(A)
    h.out.unreachable.add(A)
    h.tick(0.1)
    assert not h.core.clients.owed


def test_repeated_failed_sends_to_a_cut_off_client_count_one_cut_off():
    h, [w] = _ready_pool(capacity=4)
    for i in range(1, 5):
        h.request(A, i)
    h.out.not_reading.add(A)
    for rid in h.dispatched_to(w):
        h.reply(w, rid)  # the first cuts A off; the rest are late replies of cancelled ones
    h.request(A, 9)  # refused; the refusal cannot be sent either
    assert h.core.stats["clients_cut_off"] == 1
    assert len(h.core.clients._expiry) == 1
    assert not h.core.requests.records


# -- configuration and status ------------------------------------------------------------------
def test_limits_load_from_the_router_table_and_show_in_status(tmp_path):
    from workerpool.cli import format_status
    from workerpool.config import PoolConfig, RouterConfig

    defaults = RouterConfig()
    assert defaults.max_client_inflight < PoolConfig().services[0].queue_capacity
    assert defaults.max_unread_replies >= defaults.max_client_inflight
    path = tmp_path / "pool.toml"
    path.write_text("[router]\nmax_client_inflight = 7\nmax_unread_replies = 9\n"
                    "slow_client_cutoff = 2.5\n")
    router = PoolConfig.load(path).router
    assert (router.max_client_inflight, router.max_unread_replies,
            router.slow_client_cutoff) == (7, 9, 2.5)

    h, [w] = _ready_pool(capacity=2)
    h.request(A, 1)
    h.request(B, 1)
    h.out.not_reading.add(B)
    for rid in h.dispatched_to(w):
        h.reply(w, rid)
    last = format_status(h.core.status()).splitlines()[-1]
    assert last.endswith(" clients 0 cut off 1"), last
