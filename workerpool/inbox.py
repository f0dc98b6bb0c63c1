"""What one received ZeroMQ message carries: itself, or the messages of a BUNDLE.

::

    socket --frames--> messages() --[frames], [frames], ...--> protocol.decode, one by one

A peer may send several one-frame messages as one BUNDLE (docs/protocol.md 2.6); the
worker, its heartbeat thread and the supervisor take each message inside exactly as if
it had come alone, so they all read their sockets through this.
"""

from __future__ import annotations

from ipc import protocol
from ipc.protocol import Kind


def messages(frames: list) -> list[list]:
    """The messages in ``frames`` (routing ids already stripped), in order, each as the
    frames ``protocol.decode`` takes: ``[frames]`` itself unless it is a BUNDLE, else one
    one-frame list per message inside it.

    Raises ``FrameError`` for a malformed BUNDLE only (its header, or ``bad-bundle``): it
    is refused whole, and the caller answers nothing under its id, which is a count. Any
    other message is returned unread; its own checks are ``protocol.decode``'s.
    """
    head = frames[0]
    if len(head) < protocol.HEADER_SIZE or head[3] != Kind.BUNDLE:
        return [frames]
    protocol.split(frames)  # the BUNDLE's own header and lengths; frames after the head
    # are ignored (2.6)
    return [[m] for m in protocol.unbundle(head)]
