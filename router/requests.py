"""Request records: the router's single source of truth for every admitted request.

A record exists from admission until its final reply is sent, and is removed exactly
then. Every outcome (result, error, crash, timeout, cancel) is that removal, done in one
place (``Router._finish``), so a request can never get two final replies; a reply that
arrives for a record already gone is dropped and counted.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.health import Conn


class Phase(enum.Enum):
    QUEUED = "queued"  # waiting in its service's queue
    RUNNING = "running"  # sent to ``conn``, no final reply yet
    ORPHANED = "orphaned"  # client answered (timeout, cancel) but ``conn`` still runs it
    DONE = "done"  # final reply sent and the worker is done with it


class Record:
    __slots__ = (
        "admitted_at",
        "body",
        "buffers",
        "client",
        "client_rid",
        "conn",
        "deadline",
        "dispatched_at",
        "idempotent",
        "meta_frame",
        "method",
        "phase",
        "priority",
        "rid",
        "service",
        "starts",
        "streamed",
        "wait_until",
    )

    def __init__(self, rid: int, client: bytes, client_rid: int, service: str, method: str,
                 meta_frame: bytes, body: bytes, buffers: list, deadline: float | None,
                 admitted_at: float, priority: int = 0, idempotent: bool = False) -> None:
        self.rid = rid
        self.client = client
        self.client_rid = client_rid
        self.service = service
        self.method = method
        self.meta_frame = meta_frame
        self.body = body
        self.buffers = buffers
        self.deadline = deadline
        self.admitted_at = admitted_at
        self.priority = priority
        self.idempotent = idempotent
        self.starts = 0  # times a worker died while running it (retries, poison detection)
        self.streamed = False  # partial replies went out: it can no longer be retried
        self.wait_until = 0.0  # max_wait deadline of its current stay in the queue
        self.dispatched_at = 0.0
        self.phase = Phase.QUEUED
        self.conn: Conn | None = None
