"""A supervisor's pings of its router (workerpool/link.py): round trips, and one HELLO
however many queued pings a healed link brings answers to; and a supervisor the router
replaced stopping."""

from __future__ import annotations

import logging
import time

import pytest

from ipc import protocol, transport
from ipc.protocol import Kind
from workerpool.link import TRACKED, Register, RouterLink


def test_tokens_grow_even_within_one_millisecond():
    link = RouterLink()
    tokens = [link.ping(5.0)["ping"] for _ in range(3)]
    assert tokens == [5000, 5001, 5002]
    assert link.ping(4.0)["ping"] == 5003  # never back, whatever the clock says


def test_a_pong_measures_its_round_trip_and_the_next_ping_carries_it():
    link = RouterLink()
    assert set(link.ping(9.0)) == {"ping"}  # nothing measured yet
    # The first pong measures nothing: its ping may have left before the router was up
    # (`up` starts both at once), and a late first answer would read as the link's.
    assert link.pong({"pong": 9000, "router": "r1"}, 9.5) is Register.NO
    assert link.rtt is None
    assert set(link.ping(10.0)) == {"ping"}
    assert link.pong({"pong": 10000, "router": "r1"}, 10.004) is Register.NO
    assert link.rtt == pytest.approx(4.0) and link.srtt == pytest.approx(4.0)
    meta = link.ping(11.0)
    assert meta["rtt"] == pytest.approx(4.0) and meta["srtt"] == pytest.approx(4.0)
    link.pong({"pong": meta["ping"], "router": "r1"}, 11.012)
    assert link.rtt == pytest.approx(12.0)
    assert link.srtt == pytest.approx(4.0 + (12.0 - 4.0) / 8)  # smoothed, TCP's gain
    # A pong echoed twice, or to a token never sent, measures nothing.
    link.pong({"pong": meta["ping"], "router": "r1"}, 20.0)
    link.pong({"pong": 7, "router": "r1"}, 20.0)
    assert link.rtt == pytest.approx(12.0)


def test_the_round_trip_is_measured_and_carried_out_of_turn_after_first_contact():
    """Two pings out of turn, so the router has the round trip a few round trips after
    the link is up instead of two beats later: one right after the first pong (it
    measures), one right after the first measurement (it carries it). Then none."""
    link = RouterLink()
    assert not link.probe()  # nothing heard yet: the beats go on
    first = link.ping(0.0)["ping"]
    assert not link.probe()  # the first is unanswered
    link.pong({"pong": first, "router": "r1"}, 0.3)  # late: the router was starting
    assert link.rtt is None and link.probe()
    link.pong({"pong": link.ping(0.3)["ping"], "router": "r1"}, 0.3005)
    assert link.rtt == pytest.approx(0.5) and link.probe()
    assert link.ping(0.301)["rtt"] == pytest.approx(0.5)  # carried
    assert not link.probe()
    link.pong({"pong": link.ping(1.0)["ping"], "router": "r1"}, 1.001)
    assert not link.probe()  # later round trips ride on the beats


def test_no_ping_out_of_turn_while_one_is_unanswered():
    """After first contact the next beat's ping is already out (the link went quiet):
    no probe until its pong comes, and then it measured, so only the carrying one."""
    link = RouterLink()
    link.pong({"pong": link.ping(0.0)["ping"], "router": "r1"}, 0.1)
    token = link.ping(1.0)["ping"]  # a beat before the probe went (or instead of it)
    assert not link.probe()
    link.pong({"pong": token, "router": "r1"}, 1.002)
    assert link.rtt == pytest.approx(2.0) and link.probe()


def test_pings_that_waited_out_an_outage_measure_nothing():
    """The link goes down after one good round trip: the pings queue, and when it heals
    their pongs come together. None of them measured the link (the oldest waited the
    whole outage; the others left with it unanswered), so the figures stay as they were
    and the next ping, sent with nothing outstanding, measures again."""
    link = RouterLink()
    link.pong({"pong": link.ping(0.0)["ping"], "router": "r1"}, 0.5)  # the first: heard
    link.pong({"pong": link.ping(1.0)["ping"], "router": "r1"}, 1.002)
    assert link.rtt == pytest.approx(2.0)
    tokens = [link.ping(2.0 + t)["ping"] for t in range(TRACKED + 2)]
    for token in tokens:
        link.pong({"pong": token, "router": "r1"}, 30.0)
    assert link.rtt == pytest.approx(2.0) and link.srtt == pytest.approx(2.0)
    link.pong({"pong": link.ping(31.0)["ping"], "router": "r1"}, 31.003)
    assert link.rtt == pytest.approx(3.0)
    # A pong that comes after a newer ping left measures nothing either: it was slower
    # than the ping interval, and which ping the link held is not known.
    old, new = link.ping(32.0)["ping"], link.ping(33.0)["ping"]
    link.pong({"pong": old, "router": "r1"}, 33.2)
    link.pong({"pong": new, "router": "r1"}, 33.2)
    assert link.rtt == pytest.approx(3.0)


def test_a_lost_supervisor_registers_again_once_for_all_the_queued_pings():
    link = RouterLink()
    link.hello_sent()  # at start, before any ping
    first = link.ping(1.0)["ping"]
    assert link.pong({"pong": first, "router": "r1"}, 1.001) is Register.NO
    # The link goes down for 35 s: 35 pings queue, the router declares the supervisor
    # lost, and when the link heals it answers each of them with "hello".
    queued = [link.ping(2.0 + i)["ping"] for i in range(35)]
    answers = []
    for t in queued:
        answers.append(link.pong({"pong": t, "router": "r1", "hello": True}, 37.5))
        if answers[-1] is not Register.NO:
            link.hello_sent()  # as the supervisor does
    assert answers == [Register.LOST] + [Register.NO] * 34
    # A ping sent after that HELLO, still answered with hello: the router wants another.
    later = link.ping(38.0)["ping"]
    assert link.pong({"pong": later, "router": "r1", "hello": True}, 38.1) is Register.LOST


def test_a_restarted_router_is_registered_with_once():
    link = RouterLink()
    link.hello_sent()
    link.pong({"pong": link.ping(1.0)["ping"], "router": "r1"}, 1.0)
    queued = [link.ping(2.0 + i)["ping"] for i in range(5)]
    assert link.pong({"pong": queued[0], "router": "r2"}, 7.0) is Register.RESTARTED
    link.hello_sent()
    # The old router's late pong, then the new one's: the HELLO answered both.
    assert link.pong({"pong": queued[1], "router": "r1"}, 7.0) is Register.NO
    assert [link.pong({"pong": t, "router": "r2"}, 7.0) for t in queued[2:]] == [Register.NO] * 3
    assert link.instance == "r2"
    assert link.pong({"pong": link.ping(8.0)["ping"], "router": "r2"}, 8.0) is Register.NO


def test_a_pong_without_a_token_is_taken_as_it_comes():
    link = RouterLink()
    link.hello_sent()
    assert link.pong({"router": "r1"}, 1.0) is Register.NO and link.instance == "r1"
    assert link.pong({"router": "r2"}, 1.0) is Register.RESTARTED
    assert link.pong({"pong": "x", "router": "r2", "hello": True}, 1.0) is Register.LOST
    assert link.rtt is None


def _answers(router, ident: bytes, metas: list[dict]) -> None:
    for meta in metas:
        transport.send(router, [ident, *protocol.encode(Kind.HEARTBEAT, 0, meta)])


def _from_supervisor(router, timeout: float = 2.0) -> list[protocol.Message]:
    out = []
    while router.poll(int(timeout * 1000)):
        out.append(protocol.decode(router.recv_multipart()[1:]))
        timeout = 0.2
    return out


def _drain(sup, until, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        sup._drain_socket()
        time.sleep(0.01)


def test_35_pongs_with_hello_to_old_pings_bring_one_hello(standin_supervisor, caplog):
    sup, router, ident = standin_supervisor
    sup._link.hello_sent()  # the fixture sent the HELLO past the link
    now = time.monotonic()
    for i in range(35):  # a link down: the pings queue
        sup._beat(now + i * 0.001)
    pings = [m.meta["ping"] for m in _from_supervisor(router) if m.kind is Kind.HEARTBEAT]
    assert len(pings) == 35
    _answers(router, ident, [{"pong": p, "router": "r1", "hello": True} for p in pings])
    _drain(sup, lambda: sup._link.instance == "r1" and "registering again" in caplog.text)
    time.sleep(0.1)
    sup._drain_socket()
    got = _from_supervisor(router, 0.5)
    # One HELLO; and, nothing measured yet with every ping answered, a ping out of turn.
    assert [m.kind for m in got] == [Kind.HELLO, Kind.HEARTBEAT]
    assert caplog.text.count("registering again") == 1
    assert got[0].meta["pid"] and "node" not in got[0].meta  # `up`'s: no node name
    # The queued pings measured nothing: each waited out the outage. The one out of turn,
    # sent with none outstanding, measures the link, and the next, also out of turn,
    # carries it; after that the beats alone.
    probe = got[1]
    assert "rtt" not in probe.meta
    _answers(router, ident, [{"pong": probe.meta["ping"], "router": "r1"}])
    _drain(sup, lambda: sup._link.rtt is not None)
    (ping,) = _from_supervisor(router, 1.0)
    assert 0 <= ping.meta["rtt"] < 1000 and ping.meta["srtt"] == ping.meta["rtt"]
    _answers(router, ident, [{"pong": ping.meta["ping"], "router": "r1"}])
    _drain(sup, lambda: not sup._link._sent)
    assert _from_supervisor(router, 0.3) == []


def test_35_pongs_from_a_restarted_router_bring_one_hello(standin_supervisor, caplog):
    sup, router, ident = standin_supervisor
    sup._link.hello_sent()
    sup._beat(time.monotonic())
    (first,) = _from_supervisor(router)
    _answers(router, ident, [{"pong": first.meta["ping"], "router": "old"}])
    _drain(sup, lambda: sup._link.instance == "old")
    for i in range(35):
        sup._beat(time.monotonic() + i * 0.001)
    pings = [m.meta["ping"] for m in _from_supervisor(router)]
    _answers(router, ident, [{"pong": p, "router": "new"} for p in pings])
    _drain(sup, lambda: "router restarted" in caplog.text)
    time.sleep(0.1)
    sup._drain_socket()
    # One HELLO, and a ping out of turn: every pong came after a newer ping left, so
    # nothing is measured yet.
    assert [m.kind for m in _from_supervisor(router, 0.5)] == [Kind.HELLO, Kind.HEARTBEAT]
    assert caplog.text.count("registering again") == 1 and sup._link.instance == "new"


def test_a_replaced_supervisor_stops_without_a_drain_of_its_own(standin_supervisor, caplog):
    """Another supervisor registered under its node: the router says so in DRAINED, and the
    supervisor stops, logging why, and asks the router for nothing more."""
    sup, router, ident = standin_supervisor
    caplog.set_level(logging.INFO, logger="workerpool.supervisor")
    transport.send(router, [ident, *protocol.encode(
        Kind.DRAINED, 0, {"reason": "replaced: another supervisor registered as node 'a'"})])
    _drain(sup, lambda: sup._stopping)
    assert sup._drained
    assert "stopping (router drained: replaced: another supervisor registered as node 'a')" \
        in caplog.text
    assert _from_supervisor(router, 0.5) == []


def test_a_refused_supervisor_says_why_and_exits_with_status_1(standin_supervisor, caplog):
    """The router refused its HELLO: it logs the router's reason as an error, stops
    without a DRAIN of its own, and its exit status says it failed."""
    sup, router, ident = standin_supervisor
    transport.send(router, [ident, *protocol.encode(
        Kind.DRAINED, 0, {"reason": "HELLO refused: bad node name 'x'", "refused": True})])
    _drain(sup, lambda: sup._stopping)
    assert sup._drained and sup.exit_code == 1
    assert "the router refused this supervisor: HELLO refused: bad node name 'x'" in caplog.text
    assert _from_supervisor(router, 0.5) == []
