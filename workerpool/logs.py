"""Logging for every process workerpool starts: plain text, or one JSON object per line.

::

    workerpool up/router/worker --log-format, [logging] format
        --> setup_logging(level, format, role) in this process
        --> $WORKERPOOL_LOG_LEVEL, $WORKERPOOL_LOG_FORMAT --> the router and workers it
            starts, which call setup_logging(role=...) and read them
    log.info("...", extra={"event": ..., "worker": ...})
        --> root logger --> LineHandler: JsonFormatter(record), one write(2) --> stderr

A pool's processes share one stderr. Each JSON line is written with a single ``write(2)``
on the file descriptor, which keeps it whole among the other processes' lines: on a
regular file always, on a pipe or socket up to ``PIPE_BUF`` bytes, so there a longer
line is cut to that size (``truncated`` says it was). The text format is today's
stdlib format, unchanged, and JSON is only what the standard library writes (no new
dependency): a small formatter is all structured logs need here.

A record's ``extra=`` fields become the line's fields. The formatter never fails on
them: a value JSON cannot hold is written as its ``repr`` (bytes as text), and a line
is one line whatever the message or traceback holds (newlines and non-ASCII characters
are escaped).
"""

from __future__ import annotations

import json
import logging
import os
import select
import stat
import sys
import threading
import time
from typing import Any, Literal

LOG_LEVEL_ENV = "WORKERPOOL_LOG_LEVEL"
LOG_FORMAT_ENV = "WORKERPOOL_LOG_FORMAT"
LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

# What every record has; anything else on a record came from ``extra=`` and is a field.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName"}
# The line's own keys, in this order; a field of the same name is written with a
# trailing underscore instead (``worker`` is the exception: it is a field and a key).
_KEYS = ("time", "level", "role", "worker", "pid", "logger", "message")
_RESERVED = frozenset(_KEYS) | {"exc", "stack", "truncated"}
# Kept whole when a line is cut to fit a pipe.
_KEPT = ("time", "level", "role", "worker", "pid", "logger", "truncated")
_CUT = "..."


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON: ``time`` (ISO 8601, UTC, milliseconds),
    ``level``, ``role``, ``worker`` (where there is one), ``pid``, ``logger``,
    ``message``, the record's ``extra=`` fields, and ``exc`` (the traceback) if any.

    Parameters
    ----------
    role:
        The process's role (``router``, ``supervisor``, ``worker``, ``cli``).
    worker:
        The slot id of a worker process: every line of it carries it. A record's own
        ``worker`` field (a supervisor or router logging about a worker) wins.
    max_bytes:
        Longest line, newline excluded; a longer one keeps the start of its message, the
        end of its traceback, and says ``"truncated": <its full length>``. None: no limit.
    """

    def __init__(self, role: str, worker: str | None = None,
                 max_bytes: int | None = None) -> None:
        super().__init__()
        self.role = role
        self.worker = worker
        self.max_bytes = max_bytes

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _utc(record),
            "level": record.levelname,
            "role": self.role,
        }
        worker = record.__dict__.get("worker", self.worker)
        if worker is not None:
            out["worker"] = worker
        out["pid"] = record.process
        out["logger"] = record.name
        out["message"] = _message(record)
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and key != "worker":
                out[key + "_" if key in _RESERVED else key] = value
        if record.exc_info and not record.exc_text:  # cached, as logging.Formatter does
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        line = _dumps(out)
        if self.max_bytes is not None and len(line) > self.max_bytes:
            line = _fit(out, len(line), self.max_bytes)
        return line


class LineHandler(logging.Handler):
    """Writes each formatted record and a newline to ``fd`` with one ``os.write``, so
    that lines from processes sharing the descriptor never mix (see the module doc)."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
            while data:  # a short write (a signal mid-way) is finished, never dropped
                data = data[os.write(self.fd, data):]
        except Exception:
            self.handleError(record)


def atomic_limit(fd: int) -> int | None:
    """The longest line one ``write(2)`` to ``fd`` keeps whole among other writers:
    ``PIPE_BUF`` for a pipe or socket, None (any) for a file or a terminal."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return None
    return select.PIPE_BUF - 1 if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) else None


# -- process set-up --------------------------------------------------------------------------
_installed: logging.Handler | None = None  # the root handler setup_logging put there
_format: str = "text"  # of this process, once setup_logging installed a handler


def setup_logging(level: str | None = None, fmt: str | None = None, role: str = "cli",
                  worker: str | None = None) -> None:
    """Log to stderr at ``level`` (default: $WORKERPOOL_LOG_LEVEL, else INFO) in format
    ``fmt`` (``text`` or ``json``; default: $WORKERPOOL_LOG_FORMAT, else text), as a
    process of ``role``. Called again, it replaces what it set up; it leaves alone a
    root logger that someone else (a test harness, a program embedding the pool)
    configured first."""
    global _installed, _format
    level = (level or os.environ.get(LOG_LEVEL_ENV) or "INFO").upper()
    fmt = (fmt or os.environ.get(LOG_FORMAT_ENV) or "text").lower()
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
        _installed = None
    elif root.handlers:
        return
    if fmt == "json":
        fd = _stderr_fd()
        handler: logging.Handler = LineHandler(fd)
        handler.setFormatter(JsonFormatter(role, worker, atomic_limit(fd)))
        # Everything else a process writes to stderr goes through logging too, so that
        # the stream stays JSON: warnings, and tracebacks nothing caught.
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
        fmt = "text"
        if sys.excepthook is _log_uncaught:  # back to Python's own, if they were ours
            sys.excepthook = sys.__excepthook__
            threading.excepthook = threading.__excepthook__
            logging.captureWarnings(False)
    root.addHandler(handler)
    root.setLevel(level)
    _installed = handler
    _format = fmt


def log_format() -> str:
    """This process's log format: ``json`` once setup_logging chose it, else ``text``."""
    return _format


class _SlotLog(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        slot = self.extra["slot"]
        kwargs["extra"] = {"worker": slot, **(kwargs.get("extra") or {})}
        return (msg if _format == "json" else f"[{slot}] {msg}"), kwargs


def slot_logger(logger: logging.Logger, slot: str) -> logging.LoggerAdapter:
    """``logger`` for one worker slot: its records carry ``worker=slot``, and in the text
    format its messages start with ``[slot] `` (a pool's workers share one stderr, and
    their lines must say which worker wrote them)."""
    return _SlotLog(logger, {"slot": slot})


# -- helpers ---------------------------------------------------------------------------------
def _stderr_fd() -> int:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an object without one
        return 2


def _log_uncaught(exc_type, exc, tb) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    logging.getLogger("workerpool").critical("uncaught %s", exc_type.__name__,
                                             exc_info=(exc_type, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("workerpool").critical(
        "uncaught %s in thread %s", args.exc_type.__name__, name,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _utc(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + \
        f".{int(record.msecs):03d}Z"


def _message(record: logging.LogRecord) -> str:
    """The record's message; a call whose arguments do not fit its format (a bug in the
    caller) still gives a line, with both, rather than logging's own error report."""
    try:
        return record.getMessage()
    except Exception as exc:
        return f"{_repr(record.msg)} % {_repr(record.args)} ({type(exc).__name__}: {exc})"


def _repr(obj: object) -> str:
    try:
        return repr(obj)
    except Exception:
        return f"<{type(obj).__name__} object (repr failed)>"


def _jsonable(obj: object) -> object:
    """JSON for what the json module cannot write: bytes as text, sets as lists, the
    rest as its repr."""
    if isinstance(obj, bytes | bytearray | memoryview):
        return bytes(obj).decode("utf-8", "backslashreplace")
    if isinstance(obj, set | frozenset):
        return list(obj)
    return _repr(obj)


def _encode(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=True, allow_nan=False, default=_jsonable,
                      separators=(",", ":"))


def _field(value: object) -> str:
    """One field's JSON; a value JSON refuses even with ``_jsonable`` (NaN, a key that
    is not a string, a cycle) becomes its repr."""
    try:
        return _encode(value)
    except (TypeError, ValueError, RecursionError):
        return _encode(_repr(value))


def _dumps(out: dict[str, Any]) -> str:
    try:
        return _encode(out)
    except (TypeError, ValueError, RecursionError):
        return "{" + ",".join(f"{_encode(k)}:{_field(v)}" for k, v in out.items()) + "}"


def _fit(out: dict[str, Any], length: int, limit: int) -> str:
    """``out`` as a line of at most ``limit`` bytes, saying ``"truncated": length``. The
    fields but the line's fixed keys share the room left: the shorter ones are kept
    whole, the longer ones cut to an equal share, a traceback from its start (its end
    says what was raised), anything else from its end."""
    out = {**out, "truncated": length}
    sizes = {k: len(_field(v)) for k, v in out.items() if k not in _KEPT}
    left = limit - (len(_dumps(out)) - sum(sizes.values()))
    count = len(sizes)
    for key in sorted(sizes, key=sizes.__getitem__):
        share = max(0, left // count)
        count -= 1
        if sizes[key] > share:
            out[key] = _shorten(out[key], share, from_start=key in ("exc", "stack"))
        left -= len(_field(out[key]))
    line = _dumps(out)
    if len(line) <= limit:
        return line
    kept = {k: out[k] for k in _KEPT if k in out}  # fixed keys too long to share: odd
    return _dumps({**kept, "message": _shorten(out.get("message", ""), limit // 4, False)})


def _shorten(value: object, size: int, from_start: bool) -> str:
    """``value`` (its JSON, if not a string) cut, with ``...`` where it was cut, to the
    longest text whose JSON takes at most ``size`` bytes."""
    text = value if isinstance(value, str) else _field(value)

    def cut(keep: int) -> str:
        return _CUT + text[len(text) - keep:] if from_start else text[:keep] + _CUT

    lo, hi = 0, len(text)
    while lo < hi:  # the most characters that fit: escapes make some take several bytes
        mid = (lo + hi + 1) // 2
        if len(_encode(cut(mid))) <= size:
            lo = mid
        else:
            hi = mid - 1
    return cut(lo)
