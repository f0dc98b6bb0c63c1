"""Retries: an idempotent request whose worker dies is run again elsewhere; a request
that keeps killing workers is failed as poisoned; never two replies for one request."""

from __future__ import annotations

import os
import signal

import pytest

from ipc.protocol import Kind
from tests.raw import RawPeer
from workerpool import Client, WorkerCrashedError
from workerpool.errors import PoisonedRequestError


def test_idempotent_request_survives_its_worker(procs):
    pool = procs.pool("--policy", "round-robin", workers=2)
    with Client(pool.address, timeout=30) as c:
        fut = c.submit("sleep", {"seconds": 0.5}, idempotent=True)
        victim = pool.busiest_worker()
        os.kill(victim["pid"], signal.SIGKILL)
        assert fut.result() == {"seconds": 0.5}  # ran again, answered once
        plain = c.submit("sleep", {"seconds": 0.5})
        victim = pool.busiest_worker()
        os.kill(victim["pid"], signal.SIGKILL)
        with pytest.raises(WorkerCrashedError):
            plain.result()
    svc = pool.status()["services"][0]
    assert svc["retried"] == 1


def test_a_request_that_kills_workers_is_poisoned(procs):
    pool = procs.pool(workers=2)
    with Client(pool.address, timeout=30) as c:
        with pytest.raises(PoisonedRequestError, match=r"killed 2 workers") as info:
            c.call("segfault", idempotent=True)
        assert info.value.retryable is False
        pool.wait_ready(2)
        assert c.call("echo", "still serving") == "still serving"
    svc = pool.status()["services"][0]
    assert svc["retried"] == 1 and svc["poisoned"] == 1
    assert sum(w["restarts"] for w in pool.status()["workers"]) == 2


def test_service_default_and_per_request_override(procs):
    pool = procs.pool_from_config(
        '[[services]]\nname = "default"\nhandler = "workerpool.handlers:Faulty"\n'
        "workers = 2\nidempotent = true\nmax_attempts = 3\npoison_threshold = 3\n")
    with Client(pool.address, timeout=30) as c:
        fut = c.submit("sleep", {"seconds": 0.5})  # idempotent by the service's default
        os.kill(pool.busiest_worker()["pid"], signal.SIGKILL)
        assert fut.result() == {"seconds": 0.5}
        pool.wait_ready(2)
        fut = c.submit("sleep", {"seconds": 0.5}, idempotent=False)  # the caller says no
        os.kill(pool.busiest_worker()["pid"], signal.SIGKILL)
        with pytest.raises(WorkerCrashedError):
            fut.result()
        # max_attempts: started 3 times, each time its worker dies (poison_threshold 3 is
        # reached at the same time: poisoned wins).
        with pytest.raises(PoisonedRequestError):
            c.call("segfault")


def test_a_stream_with_partials_sent_is_not_retried(procs):
    pool = procs.pool(handler="tests.handlers:Streams", workers=2)
    with Client(pool.address, timeout=30) as c:
        got = []
        with pytest.raises(WorkerCrashedError, match="partial replies were already sent"):
            for item in c.stream("count_then_crash", {"n": 3}, idempotent=True):
                got.append(item)
        assert got == [0, 1, 2]


def test_kill_with_200_idempotent_in_flight_answers_each_exactly_once(procs):
    pool = procs.pool("--max-inflight", "64", "--policy", "round-robin")
    peer = RawPeer(pool.address)
    try:
        ids = range(1, 201)
        for i in ids:
            peer.request(i, "sleep", {"seconds": 0.02}, idempotent=True)
        victim = pool.busiest_worker(more_than=100)
        os.kill(victim["pid"], signal.SIGKILL)
        peer.collect(ids, timeout=30)
        assert sorted(peer.finals) == list(ids)
        assert all(len(r) == 1 for r in peer.finals.values()), "duplicate replies"
        assert all(r[0][0] is Kind.RESULT for r in peer.finals.values())
    finally:
        peer.close()
