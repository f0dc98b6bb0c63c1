"""Structured logs: the JSON formatter with plain records, the one-write line handler,
and a process's set-up. The live pool is in test_logs_live.py."""

from __future__ import annotations

import json
import logging
import os
import re
import select
import subprocess
import sys
import textwrap
import time

import pytest
from click.testing import CliRunner

from ipc.protocol import Kind
from tests.conftest import ROOT
from workerpool import logs
from workerpool.cli import main
from workerpool.config import PoolConfig
from workerpool.logs import JsonFormatter

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def record(msg: object = "hello %s", args: tuple = ("world",), levelno: int = logging.INFO,
           exc_info=None, **extra: object) -> logging.LogRecord:
    rec = logging.getLogger("workerpool.test").makeRecord(
        "workerpool.test", levelno, __file__, 1, msg, args, exc_info)
    rec.__dict__.update(extra)
    return rec


def line(rec: logging.LogRecord, **formatter: object) -> dict:
    text = JsonFormatter(**{"role": "router", **formatter}).format(rec)
    assert "\n" not in text and text.isascii()
    return json.loads(text)


def test_a_plain_record_has_the_fixed_keys_in_order():
    rec = record()
    out = line(rec)
    assert list(out) == ["time", "level", "role", "pid", "logger", "message"]
    assert TIME.match(out["time"]), out["time"]
    assert out["time"][:19] == time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(rec.created))
    assert (out["level"], out["role"], out["pid"], out["logger"], out["message"]) == (
        "INFO", "router", os.getpid(), "workerpool.test", "hello world")


def test_the_time_is_utc_with_milliseconds():
    rec = record()
    rec.created, rec.msecs = 86400 * 365 + 0.0421, 42.1
    assert line(rec)["time"] == "1971-01-01T00:00:00.042Z"


def test_extra_fields_are_fields_and_the_worker_key_comes_from_the_record_or_the_process():
    out = line(record(event="worker-died", cause="SIGKILL", signal=9, requests=[1, 2]))
    assert {k: out[k] for k in ("event", "cause", "signal", "requests")} == {
        "event": "worker-died", "cause": "SIGKILL", "signal": 9, "requests": [1, 2]}
    assert "worker" not in out
    assert line(record(), worker="default/1")["worker"] == "default/1"
    assert line(record(worker="default/2"), worker="default/1")["worker"] == "default/2"
    assert list(line(record(worker="x/0")))[:5] == ["time", "level", "role", "worker", "pid"]


def test_a_field_named_like_a_key_does_not_replace_it():
    out = line(record(time="t", level="l", role="r", pid=1, logger="g", exc="e"))
    assert out["role"] == "router" and out["pid"] == os.getpid()
    assert (out["time_"], out["level_"], out["role_"], out["pid_"], out["logger_"],
            out["exc_"]) == ("t", "l", "r", 1, "g", "e")


def test_newlines_and_non_ascii_stay_one_line_and_come_back_exactly():
    msg = 'two\nlines\r\tand "quotes" \\ é 世界 \x00 \U0001f600'
    assert line(record(msg, ()))["message"] == msg
    assert line(record("%s", (msg,), note=msg))["note"] == msg


class _BadRepr:
    def __repr__(self):
        raise RuntimeError("no repr")


def test_fields_json_cannot_hold_still_give_one_valid_line():
    cyclic: list = []
    cyclic.append(cyclic)
    out = line(record(ident=b"sup-\xff\x00", kinds={3}, obj=object(), nan=float("nan"),
                      inf=float("-inf"), tuple_keys={(1, 2): "x"}, cyclic=cyclic,
                      bad=_BadRepr(), fine=[1, "a", None, True]))
    assert out["ident"] == "sup-\\xff\x00"
    assert out["kinds"] == [3]
    assert out["obj"].startswith("<object object at")
    assert (out["nan"], out["inf"]) == ("nan", "-inf")
    assert out["tuple_keys"] == "{(1, 2): 'x'}"
    assert out["cyclic"] == "[[...]]"
    assert out["bad"] == "<_BadRepr object (repr failed)>"
    assert out["fine"] == [1, "a", None, True]
    assert out["message"] == "hello world"


def test_arguments_that_do_not_fit_the_message_still_give_a_line():
    out = line(record("%d requests", ("many",)))
    assert out["message"].startswith("'%d requests' % ('many',) (TypeError:")


def test_a_traceback_goes_in_exc_on_the_same_line():
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        rec = record("it failed", (), levelno=logging.ERROR, exc_info=sys.exc_info())
    out = line(rec)
    assert out["message"] == "it failed"
    assert out["exc"].startswith("Traceback (most recent call last):")
    assert out["exc"].endswith("ValueError: boom\nsecond line")
    assert out["level"] == "ERROR"


def test_a_line_over_the_limit_keeps_the_start_of_the_message_and_the_end_of_the_traceback():
    def chain(n):  # a traceback of n tracebacks, each raised while handling the one before
        try:
            if n:
                chain(n - 1)
            raise OSError("the first failure")
        finally:
            if n == 60:
                raise KeyError("the real cause")
            raise ValueError(f"failure {n}")

    try:
        chain(60)
    except KeyError:
        rec = record("x" * 3000 + "%s", ("é" * 2000,), levelno=logging.ERROR,
                     exc_info=sys.exc_info(), requests=[{"id": i} for i in range(500)])
    full = JsonFormatter("worker").format(rec)
    text = JsonFormatter("worker", "default/0", max_bytes=4095).format(rec)
    assert len(full) > 20000 and len(text) <= 4095
    out = json.loads(text)
    assert out["truncated"] == len(JsonFormatter("worker", "default/0").format(rec))
    assert out["worker"] == "default/0" and out["role"] == "worker"
    assert out["message"].startswith("xxxx") and out["message"].endswith("...")
    assert out["exc"].startswith("...") and out["exc"].endswith("KeyError: 'the real cause'")
    assert json.loads(JsonFormatter("worker", max_bytes=4095).format(record()))["message"] == \
        "hello world"  # short lines are left alone


def test_the_slot_logger_prefixes_text_and_gives_json_a_field(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="workerpool.test")
    log = logs.slot_logger(logging.getLogger("workerpool.test"), "default/3")
    log.info("ready", extra={"event": "x"})
    monkeypatch.setattr(logs, "_format", "json")
    log.info("ready")
    text, js = caplog.records
    assert (text.getMessage(), text.worker, text.event) == ("[default/3] ready", "default/3", "x")
    assert (js.getMessage(), js.worker) == ("ready", "default/3")


def test_the_config_file_and_the_flag_choose_the_format(tmp_path):
    path = tmp_path / "pool.toml"
    path.write_text('[logging]\nformat = "json"\n')
    assert PoolConfig.load(path).logging.format == "json"
    assert PoolConfig.load(None).logging.format == "text"
    path.write_text('[logging]\nformat = "yaml"\n')
    for command in ("up", "router", "worker --router tcp://127.0.0.1:1"):
        out = CliRunner().invoke(main, [*command.split(), "--config", str(path)])
        assert out.exit_code == 2 and "logging.format" in out.output, out.output
        out = CliRunner().invoke(main, [*command.split(), "--log-format", "yaml"])
        assert out.exit_code == 2 and "'yaml' is not one of 'text', 'json'" in out.output


_WRITER = textwrap.dedent("""
    import logging, sys, warnings
    from workerpool.logs import setup_logging
    setup_logging(fmt="json", role="worker", worker=sys.argv[1])
    log = logging.getLogger("workerpool.test")
    for i in range(int(sys.argv[2])):
        log.info("%s", sys.argv[1] * (int(sys.argv[3]) // len(sys.argv[1])), extra={"i": i})
    warnings.warn("careful")
    raise RuntimeError("nobody caught this")
""")


def test_lines_of_processes_sharing_a_pipe_never_mix():
    """Four processes write long lines (and one over PIPE_BUF, cut to fit) into one pipe,
    as a pool's processes do into its stderr: every line read back is whole JSON. Each
    ends with a warning and an uncaught exception, which are JSON lines too."""
    r, w = os.pipe()
    sizes = {"a/0": 3000, "b/1": 3700, "c/2": 9000, "d/3": 100}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    children = [subprocess.Popen([sys.executable, "-c", _WRITER, slot, "150", str(size)],
                                 stderr=w, cwd=ROOT, env=env) for slot, size in sizes.items()]
    os.close(w)
    data = b""
    with os.fdopen(r, "rb") as pipe:
        while ready := select.select([pipe], [], [], 30)[0]:
            chunk = os.read(ready[0].fileno(), 1 << 16)
            if not chunk:
                break
            data += chunk
    assert [c.wait(30) for c in children] == [1, 1, 1, 1]
    lines = [json.loads(text) for text in data.decode().splitlines()]
    for slot, size in sizes.items():
        mine = [x for x in lines if x["worker"] == slot]
        assert [x["i"] for x in mine if "i" in x] == list(range(150))
        assert all(x["role"] == "worker" for x in mine)
        assert all(len(json.dumps(x, separators=(",", ":"))) < 4096 for x in mine)
        long = [x for x in mine if "truncated" in x]
        assert len(long) == (150 if size > 4096 else 0)
        warning, uncaught = mine[-2:]
        assert warning["logger"] == "py.warnings" and "careful" in warning["message"]
        assert uncaught["level"] == "CRITICAL" and uncaught["message"] == "uncaught RuntimeError"
        assert uncaught["exc"].endswith("RuntimeError: nobody caught this")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_setup_logging_leaves_a_root_logger_someone_else_configured_alone(fmt, monkeypatch):
    root = logging.getLogger()
    monkeypatch.setattr(logs, "_installed", None)
    handlers = list(root.handlers)
    assert handlers  # pytest's own capture
    logs.setup_logging(fmt=fmt, role="cli")
    assert root.handlers == handlers and logs.log_format() == "text"


# -- what the router logs: the core, driven with plain frames and a fake clock ----------------
C = b"\x00client1"


def _events(caplog, event: str) -> list[dict]:
    """The records of ``event``, each as the JSON line the router would write."""
    fmt = JsonFormatter("router")
    return [json.loads(fmt.format(r)) for r in caplog.records
            if getattr(r, "event", None) == event]


def _pool(caplog, **settings):
    from tests.router_harness import Harness

    caplog.set_level(logging.INFO, logger="workerpool.router")
    h = Harness()
    h.hello(workers=2, max_inflight=2, **settings)
    return h, h.ready("default/0", capacity=2)


def test_a_worker_death_is_one_line_with_how_it_died_and_what_it_held(caplog):
    h, w = _pool(caplog)
    h.request(C, 7, method="echo")  # the oldest: running when it died, not idempotent
    h.request(C, 8, method="echo")  # held, never started: back to the queue
    assert len(h.dispatched_to(w)) == 2
    h.slot_event("default/0", "died", reason="was killed by SIGKILL", exitcode=-9,
                 cause="SIGKILL", pid=1001)
    h.tick(0.01)
    [death] = _events(caplog, "worker-died")
    assert {k: death[k] for k in ("worker", "worker_pid", "device", "service", "incarnation",
                                  "cause", "exitcode", "signal", "held", "outcomes")} == {
        "worker": "default/0", "worker_pid": 1001, "device": "?", "service": "default",
        "incarnation": 1, "cause": "SIGKILL", "exitcode": None, "signal": 9, "held": 2,
        "outcomes": {"crashed": 1, "requeued": 1}}
    assert death["requests"] == [
        {"id": 7, "client": C.hex(), "method": "echo", "outcome": "crashed"},
        {"id": 8, "client": C.hex(), "method": "echo", "outcome": "requeued"}]
    assert death["level"] == "WARNING" and death["role"] == "router"
    assert death["message"] == ("worker default/0 (pid 1001) was killed by SIGKILL; it held 2 "
                                "requests (1 crashed, 1 requeued)")
    h.tick(1)
    assert len(_events(caplog, "worker-died")) == 1


def test_a_death_notice_without_a_cause_gets_one_from_its_exit_status(caplog):
    h, _ = _pool(caplog)
    h.ready("default/1")
    h.slot_event("default/0", "died", reason="was killed by SIGSEGV", exitcode=-11, pid=1001)
    h.slot_event("default/1", "died", reason="exited with code 3", exitcode=3, pid=1001)
    h.tick(0.01)
    deaths = {d["worker"]: d for d in _events(caplog, "worker-died")}
    assert [(d["cause"], d["exitcode"], d["signal"], d["held"]) for d in deaths.values()] == [
        ("SIGSEGV", None, 11, 0), ("exit", 3, None, 0)]


def test_a_poisoned_worker_dies_in_one_line_with_what_it_held_when_it_said_goodbye(caplog):
    h, w = _pool(caplog)
    h.request(C, 1)
    h.request(C, 2)
    h.backend(w, Kind.GOODBYE, {"reason": "context-poisoned", "error": "CUDA error"})
    assert not _events(caplog, "worker-died")  # not yet: its supervisor says how it ended
    h.slot_event("default/0", "died", reason="exited with code 75", exitcode=75,
                 cause="context-poisoned", pid=1001)
    h.tick(0.01)
    [death] = _events(caplog, "worker-died")
    assert (death["cause"], death["exitcode"], death["held"]) == ("context-poisoned", 75, 2)
    assert [r["id"] for r in death["requests"]] == [1, 2]


def test_a_hung_worker_declared_dead_is_one_line_even_if_its_notice_comes_late(caplog):
    h, _ = _pool(caplog)
    h.request(C, 5)
    for _ in range(20):  # silent for 10 s: killed, and declared dead after kill_grace
        h.backend(b"sup", Kind.HEARTBEAT, {"ping": 1})
        h.tick(0.5)
    [hung] = _events(caplog, "worker-hung")
    assert (hung["worker"], hung["worker_pid"]) == ("default/0", 1001)
    [death] = _events(caplog, "worker-died")
    assert (death["cause"], death["signal"], death["worker_pid"], death["held"]) == (
        "hung", None, 1001, 1)
    h.slot_event("default/0", "died", reason="was killed (SIGKILL) as hung", exitcode=-9,
                 cause="hung", pid=1001)
    h.tick(0.01)
    assert len(_events(caplog, "worker-died")) == 1


def test_shedding_is_summed_per_service_never_one_line_per_request(caplog):
    h, w = _pool(caplog, capacity_policy="reject", prefetch=0)
    h.request(C, 1)
    h.request(C, 2)
    for i in range(3, 53):  # the worker holds 2: 50 refused at once
        h.request(C, i)
    h.tick(0.01)
    [first] = _events(caplog, "backpressure-shed")
    assert (first["service"], first["refused"], first["refused_total"], first["workers"],
            first["capacity_policy"]) == ("default", 50, 50, 1, "reject")
    for i in range(53, 63):
        h.request(C, i)
        h.backend(b"sup", Kind.HEARTBEAT, {"ping": 1})
        h.backend(w + b"#hb", Kind.HEARTBEAT, {"of": w})
        h.tick(0.5)  # 10 more over 5 s: within the interval, no line
    assert len(_events(caplog, "backpressure-shed")) == 1
    h.backend(b"sup", Kind.HEARTBEAT, {"ping": 1})
    h.backend(w + b"#hb", Kind.HEARTBEAT, {"of": w})
    h.tick(6)
    second = _events(caplog, "backpressure-shed")[1]
    assert (second["refused"], second["refused_total"]) == (10, 60)
    assert second["seconds"] >= 10


def test_the_shed_log_decides_from_plain_values():
    from router.admission import ShedLog

    shed = ShedLog(started=100.0, every=10.0)
    assert shed.due(101.0, {"a": 0, "b": 0}) == []
    assert shed.due(102.0, {"a": 5, "b": 0}) == [("a", 5, 2.0)]
    assert shed.due(105.0, {"a": 9, "b": 1}) == [("b", 1, 5.0)]  # a: its last line is recent
    assert shed.due(112.0, {"a": 9, "b": 1}) == [("a", 4, 10.0)]
    assert shed.due(130.0, {"a": 9, "b": 1}) == []  # nothing new
    assert shed.due(131.0, {"a": 2, "b": 1}) == []  # a was made again: counted anew
    assert shed.due(142.0, {"a": 3, "b": 1}) == [("a", 1, 11.0)]


def test_how_a_process_ended_in_one_word_and_two_fields():
    from router.registry import death_fields
    from workerpool._proc import EXIT_POISONED, exit_cause, exit_status

    assert [exit_cause(rc) for rc in (-9, -11, -6, -65, 0, 1, 78, EXIT_POISONED)] == [
        "SIGKILL", "SIGSEGV", "SIGABRT", "signal 65", "exit", "exit", "exit",
        "context-poisoned"]
    assert exit_cause(-9, hung=True) == exit_cause(0, hung=True) == "hung"
    assert exit_status(-9) == {"exitcode": None, "signal": 9}
    assert exit_status(3) == {"exitcode": 3, "signal": None}
    assert exit_status(None) == {"exitcode": None, "signal": None}
    # From a SLOT died: the supervisor's word wins; else the status says; else unknown.
    assert death_fields({"exitcode": -9, "cause": "hung", "pid": 7}) == {
        "cause": "hung", "exitcode": None, "signal": 9, "worker_pid": 7}
    assert death_fields({"exitcode": 75})["cause"] == "context-poisoned"
    assert death_fields({"exitcode": "9", "cause": 3, "pid": True}) == {
        "cause": "unknown", "exitcode": None, "signal": None, "worker_pid": None}
    assert death_fields({"cause": "x" * 1000})["cause"] == "x" * 64
