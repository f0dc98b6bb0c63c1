"""Client library: ``Client`` (threads, ``concurrent.futures``) and ``AsyncClient`` (asyncio).

::

    Client (sync.py)                        AsyncClient (aio.py)
      user threads -> outbox -> I/O thread    coroutines -> loop reader + one loop timer
                   |                                         |
                   +--> BaseClient (_base.py): request frames, reply values; no I/O
                   +--> Replies (_replies.py): outstanding requests, deadlines, outcomes
                   |                                         |
                   +---------------> DEALER <---> router <---+

- ``_base.py``: what needs no I/O: request ids, request frames with cached meta, the
  shared-memory endpoint, reply frames into values or typed errors, the router watch.
- ``_replies.py``: the table of outstanding requests, shared by both clients: each reply,
  local deadline, router restart, cancel or close ends a request exactly once.
- ``sync.py``: ``Client``, one socket in one background I/O thread, safe to share
  between threads.
- ``aio.py``: ``AsyncClient``, one socket in one event loop.

Every request carries a client-unique id, so one connection can have thousands in
flight. A timeout travels with the request (the router answers at the deadline) and is
also enforced locally, so a call returns even when the router is unreachable.

numpy arrays and torch tensors anywhere in a payload or a reply travel as raw bytes
(ipc/codec.py). When the router is on this host, large ones go through shared memory: the
client owns a ``SegmentPool`` for its requests and a ``SegmentMapper`` for the replies.
"""

from workerpool.client._base import is_local
from workerpool.client._replies import reply_meta
from workerpool.client.aio import AsyncClient
from workerpool.client.sync import Client
from workerpool.config import DEFAULT_MAX_MESSAGE_BYTES

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "AsyncClient", "Client", "is_local", "reply_meta"]
