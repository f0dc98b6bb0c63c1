"""A worker's backlog: requests it has read and not started, oldest first.

It is shared by two threads. The main thread reads requests into it and starts them; the
heartbeat thread answers the router's RECLAIM (``give_back``) while a handler runs, which
is exactly when a request held ahead waits behind the running one and another worker may
be idle. One lock decides, so for each request exactly one of "started here" and "given
back" happens.

The router numbers the requests it sends this worker (``seq`` 1, 2, ...), and one
connection delivers them in order, so the backlog can tell a request it has not read yet
(``seq`` above the count read) from one already started or done: the first is given back
and dropped when it is read; the second is not given back.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator

from ipc.protocol import Message

MAX_GIVEN_BACK_UNREAD = 65536  # bounded like the worker's capacity; beyond it, refuse


class Backlog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._msgs: OrderedDict[int, Message] = OrderedDict()
        self._read = 0  # REQUESTs read from the socket
        self._given_back_unread: set[int] = set()

    def __len__(self) -> int:
        return len(self._msgs)

    def __contains__(self, req_id: int) -> bool:
        return req_id in self._msgs

    def ids(self) -> list[int]:
        """The request ids waiting, oldest first."""
        with self._lock:
            return list(self._msgs)

    # -- the main thread -----------------------------------------------------------------------
    def put(self, msg: Message) -> bool:
        """A REQUEST read from the socket. False: the router took it back before it was
        read; it is dropped and must not run."""
        with self._lock:
            self._read += 1
            if msg.req_id in self._given_back_unread:
                self._given_back_unread.discard(msg.req_id)
                return False
            self._msgs[msg.req_id] = msg
            return True

    def pop_oldest(self) -> Message | None:
        """The next request to start, or None (the heartbeat thread may have given the
        last one back since the caller looked)."""
        with self._lock:
            return self._msgs.popitem(last=False)[1] if self._msgs else None

    def pop(self, req_id: int) -> Message | None:
        with self._lock:
            return self._msgs.pop(req_id, None)

    def take_oldest(self, how_many: Callable[[Iterator[Message]], int]) -> list[Message]:
        """The oldest requests out of the backlog at once: ``how_many`` reads them, oldest
        first, as far as it needs to, and says how many to take."""
        with self._lock:
            n = how_many(iter(self._msgs.values()))
            return [self._msgs.popitem(last=False)[1] for _ in range(min(n, len(self._msgs)))]

    def take_matching(self, method: str, limit: int) -> list[Message]:
        """Up to ``limit`` requests for ``method``, oldest first, out of the backlog."""
        with self._lock:
            rids = [rid for rid, m in self._msgs.items()
                    if m.meta.get("method") == method][:limit]
            return [self._msgs.pop(rid) for rid in rids]

    # -- the heartbeat thread -----------------------------------------------------------------
    def give_back(self, req_id: int, seq: int) -> bool:
        """Whether request ``req_id`` (the router's ``seq``-th to this worker) is given back:
        True if it is unread or waiting here; False if it started (or finished)."""
        with self._lock:
            if seq > self._read:
                if len(self._given_back_unread) >= MAX_GIVEN_BACK_UNREAD:
                    return False
                self._given_back_unread.add(req_id)
                return True
            return self._msgs.pop(req_id, None) is not None
