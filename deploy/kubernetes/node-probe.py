"""Kubernetes probe of a ``workerpool worker`` pod: what the router's STATUS says of its node.

::

    kubelet --exec--> node-probe.py --STATUS (frontend, client key)--> router
                          | the slots named <service>/<node>/<index>
                          v
                      exit 0 (healthy) or 1, with the reason on stdout

A supervisor serves nothing over HTTP and is its pod's main process, so the outside view of
its node is the router's (docs/protocol.md, 6.3 and 6.4):

- ``readiness``: some slot of the node is registered (``ready``, ``busy`` or ``spare``).
  An unreachable router fails it too. A DaemonSet's rolling update waits for it, node by
  node, so a new image is rolled out only as fast as its workers come up.
- ``liveness``: the router answers and the node has no live slot (none ``starting``,
  ``restarting``, ``dead``, ``ready``, ``busy`` or ``spare``): its supervisor is gone
  from the router's view, silent or never registered. A router that does not answer is
  not the node's fault (its supervisor registers again by itself once it is back), so
  that passes: a router restart must not restart every GPU pod.

The node is ``--node``, else ``$WORKERPOOL_NODE`` (kubelet does not expand ``$(VAR)`` from
the downward API in a probe's command, so the pod's environment carries it).
"""

from __future__ import annotations

import argparse
import os
import sys

from ipc.lifecycle import LIVE, WorkerState
from workerpool import Client
from workerpool.errors import WorkerPoolError

SERVING = frozenset({WorkerState.READY.value, WorkerState.BUSY.value, WorkerState.SPARE.value})
LIVE_STATES = frozenset(s.value for s in LIVE)


def node_slots(status: dict, node: str) -> dict[str, str]:
    """Slot id -> state for the slots of ``node`` (ids ``<service>/<node>/<index>``)."""
    slots = {}
    for w in status.get("workers", []):
        parts = w["id"].split("/")
        if len(parts) == 3 and parts[1] == node:
            slots[w["id"]] = w["state"]
    return slots


def verdict(mode: str, status: dict | None, node: str) -> tuple[bool, str]:
    """(healthy, why) for ``mode`` given the router's STATUS, or None when it did not
    answer."""
    if status is None:
        if mode == "liveness":
            return True, "the router does not answer: not this node's fault"
        return False, "the router does not answer"
    slots = node_slots(status, node)
    wanted = SERVING if mode == "readiness" else LIVE_STATES
    good = sorted(s for s, state in slots.items() if state in wanted)
    if good:
        return True, f"{len(good)} of {len(slots)} slots of {node} are " + \
            ("registered" if mode == "readiness" else "live")
    if not slots:
        return False, f"the router knows no slot of node {node!r}"
    states = ", ".join(f"{s} {state}" for s, state in sorted(slots.items()))
    return False, f"no slot of {node} is {'registered' if mode == 'readiness' else 'live'}: {states}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["readiness", "liveness"])
    parser.add_argument("--router", required=True, help="The router's frontend address.")
    parser.add_argument("--node", default=os.environ.get("WORKERPOOL_NODE"),
                        help="This supervisor's --node [default: $WORKERPOOL_NODE].")
    parser.add_argument("--key", help="A client's secret key file (NAME.key_secret).")
    parser.add_argument("--router-key", help="The router's public key file (router.key).")
    parser.add_argument("--timeout", type=float, default=5.0, help="Seconds to wait for STATUS.")
    args = parser.parse_args(argv)
    if not args.node:
        parser.error("no node: give --node or set WORKERPOOL_NODE")
    status = None
    with Client(args.router, key=args.key, router_key=args.router_key) as client:
        try:
            status = client.status(timeout=args.timeout)
        except WorkerPoolError as exc:
            print(f"no status from {args.router}: {exc.type}: {exc.message}")
    healthy, why = verdict(args.mode, status, args.node)
    print(why)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
