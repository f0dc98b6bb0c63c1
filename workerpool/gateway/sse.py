"""Server-sent events for streaming methods: ``item`` per item, then ``end`` or ``error``.

::

    PARTIAL item  -> event: item\\ndata: <the item as JSON>\\n\\n
    END           -> event: end\\ndata: null\\n\\n
    ERROR         -> event: error\\ndata: {"error": {...}}\\n\\n   (the stream then ends)

Each event's data is one line of JSON (``json.dumps`` writes no newline), so a reader
splits on the blank line. The HTTP status is 200 once the first byte is sent; an error
before it (an unknown service, backpressure) is answered with its status instead, as a
plain call would be.
"""

from __future__ import annotations

import json
from typing import Any

from workerpool.gateway.bodies import to_json
from workerpool.gateway.statuses import shown

CONTENT_TYPE = "text/event-stream"
END = b"event: end\ndata: null\n\n"
HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
           (b"cache-control", b"no-store"),
           (b"x-accel-buffering", b"no")]  # a proxy in front (nginx) passes events at once

DEFAULT_MAX_BUFFERED = 64
"""Items received for one stream and not yet written to its HTTP client: one more ends
the stream (``stream-overrun``), so a slow reader costs the gateway bounded memory."""


def wants_events(accept: str | None) -> bool:
    """Whether the request asked for a stream of events (``Accept: text/event-stream``)."""
    return accept is not None and CONTENT_TYPE in accept.lower()


def item(value: Any) -> bytes:
    """One ``item`` event. Raises TypeError or ValueError when ``value`` has no JSON form."""
    data = json.dumps(value, default=to_json, separators=(",", ":"), ensure_ascii=False)
    return b"event: item\ndata: " + data.encode() + b"\n\n"


def error(body: dict[str, Any]) -> bytes:
    """The ``error`` event for an ERROR body's map."""
    data = json.dumps({"error": shown(body)}, separators=(",", ":"))
    return b"event: error\ndata: " + data.encode() + b"\n\n"
