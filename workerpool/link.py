"""A supervisor's pings of its router, and what their pongs mean, decided without I/O.

::

    every heartbeat:  RouterLink.ping(now) -> {"ping": token, "rtt": ms, "srtt": ms}  --> router
    on each HELLO:    RouterLink.hello_sent()
    on each pong:     RouterLink.pong(meta, now) -> Register.NO | LOST | RESTARTED   <-- router

The router answers every ping with a pong that echoes its token and names its instance,
plus ``hello`` while it counts this supervisor as lost (docs/protocol.md 8.3). Two things
follow from a pong:

- **The round trip.** A pong measures the link only when nothing else could have held
  its ping: the ping left while the link was known to be up (a pong had come, and no
  earlier ping was still unanswered), and it is still the newest ping when its pong comes.
  So the first ping (sent perhaps before the router was up) measures nothing, nor does any
  ping that waited out an outage with others queued behind it: a smoothed figure fed one
  such sample reads an outage for many seconds after it (500 ms at the start of every
  ``up``, before). A link slower than the ping interval is not measured at all. The last
  and a smoothed round trip ride on the next ping, for the router's STATUS ``nodes``.
- **When to ping out of turn.** Left to the beats, the round trip would reach the router
  two beats after start (the first ping measures nothing, the second does, the third
  carries it), and the router sizes what each worker holds ahead from it (protocol.md
  7.1). So right after the first pong, with nothing outstanding and nothing measured, the
  supervisor pings again at once, and right after the first measurement once more to carry
  it: the router has it a few round trips after first contact. Only then; later round
  trips ride on the beats.
- **Whether to register again.** A link that was down queues pings; when it heals, the
  router answers each queued one, every pong saying ``hello`` (the router declared this
  supervisor lost meanwhile). Only a pong to a ping sent *after* the last HELLO may ask
  for another: the router had read that HELLO before the ping, so it still wants one.
  A pong to an older ping is already answered by the HELLO that followed it. Tokens only
  grow, so "after" is one comparison with the token current when the HELLO left.

The supervisor (workerpool/supervisor.py) sends what ``ping`` returns and a HELLO when
``pong`` says so; the clock comes from it, so this is tested with plain values.
"""

from __future__ import annotations

import enum
import math

TRACKED = 4
"""Pings whose send time is kept (a pong to an older one measures nothing, and asks for
HELLO by its token's age alone)."""

SMOOTHING = 0.125
"""Weight of a new round trip in the smoothed one (TCP's SRTT gain, RFC 6298)."""


class Register(enum.Enum):
    """What a pong asks of the supervisor."""

    NO = "no"  # nothing: a pong like any other, or one older than the last HELLO
    LOST = "lost"  # the router gave this supervisor up as silent: send HELLO again
    RESTARTED = "restarted"  # another router instance answers: send HELLO again


class RouterLink:
    """The ping tokens, their send times, the router instance, the last HELLO's token."""

    def __init__(self) -> None:
        self.instance: str | None = None  # the router instance the last pong named
        self.rtt: float | None = None  # ms, the last round trip measured
        self.srtt: float | None = None  # ms, smoothed
        self._token = 0  # the last ping's token: the monotonic clock in ms, made to grow
        self._sent: dict[int, tuple[float, bool]] = {}  # token -> (send time, measurable)
        self._heard = False  # a pong to a ping of ours has come
        self._hello_after: int | None = None  # the token current when HELLO last left
        self._reported = False  # a ping has carried a measured round trip

    def ping(self, now: float) -> dict:
        """The meta of the ping sent at ``now`` (monotonic seconds)."""
        self._token = max(int(now * 1000), self._token + 1)
        self._sent[self._token] = (now, self._heard and not self._sent)
        if len(self._sent) > TRACKED:
            del self._sent[min(self._sent)]
        meta: dict = {"ping": self._token}
        if self.rtt is not None:
            meta["rtt"] = round(self.rtt, 3)
            meta["srtt"] = round(self.srtt, 3)
            self._reported = True
        return meta

    def probe(self) -> bool:
        """Whether to ping now instead of at the next beat (asked after each pong): after
        first contact, while no round trip is measured and no ping is unanswered (that
        ping measures); after the first measurement, until a ping has carried it."""
        if self._reported:
            return False
        return self.rtt is not None or (self._heard and not self._sent)

    def hello_sent(self) -> None:
        """A HELLO left now: pongs to the pings sent before it ask for nothing more."""
        self._hello_after = self._token

    def pong(self, meta: dict, now: float) -> Register:
        """A pong (a HEARTBEAT with ``router``) arrived at ``now``: measure, and say
        whether to register again."""
        token = meta.get("pong")
        known = type(token) is int
        sent = self._sent.pop(token, None) if known else None
        if sent is not None:
            self._heard = True
            if sent[1] and token == self._token:
                self._measure((now - sent[0]) * 1000)
        if known and self._hello_after is not None and token <= self._hello_after:
            return Register.NO  # the HELLO sent since has answered it
        instance = meta.get("router")
        before, self.instance = self.instance, instance
        if before is not None and instance != before:
            return Register.RESTARTED
        return Register.LOST if meta.get("hello") else Register.NO

    def _measure(self, ms: float) -> None:
        if not math.isfinite(ms) or ms < 0:
            return
        self.rtt = ms
        self.srtt = ms if self.srtt is None else self.srtt + SMOOTHING * (ms - self.srtt)
