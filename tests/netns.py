"""Test hosts made of Linux network namespaces: a router host and worker hosts on one
private subnet, each its own network stack, joined by veth pairs to a bridge on the router
host. What crosses between them crosses a real (virtual) link that a test can cut, heal,
slow down or make lossy, as a cable, a switch port or a congested path would.

::

    host "a" (10.213.0.2) eth0 ──veth── to_a ┐
                                            br0 (10.213.0.1) on host "r" (the router)
    host "b" (10.213.0.3) eth0 ──veth── to_b ┘

The subnet exists only inside the namespaces made here; the test process (in the machine's
own namespace) reaches the router through its ``ipc://`` frontend, a Unix socket, which
is a file and so visible from every network namespace. Needs root and iproute2 (CI runs as
root); ``unavailable()`` says why not otherwise. Everything made is removed by ``close``,
also after a failed test; namespaces a killed run left behind are removed by ``sweep``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from workerpool import Client

PREFIX = "wpt"  # every namespace made here: wpt<pid>-<host>
SUBNET = "10.213.0"
ROUTER_IP = f"{SUBNET}.1"
HANDLER = "tests.handlers:Where"
BACKEND_PORT = 5556  # free: the router host is a fresh network stack
RELAY_PORT = 7000


def unavailable() -> str | None:
    """Why namespace hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def loss_unavailable() -> str | None:
    """Why packet loss cannot be made here (nftables), or None."""
    if shutil.which("nft") is None:
        return "nftables' `nft` is not installed (bin/system-packages installs it as root)"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out


def sweep() -> None:
    """Remove namespaces of earlier runs whose process is gone (a run killed before its
    clean-up): their names carry the pid that made them."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX) or "-" not in name:
            continue
        pid = name[len(PREFIX):].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _ip("netns", "del", name, check=False)


class Hosts:
    """A router host ``r`` and worker hosts (``a``, ``b``, ...) as network namespaces.

    ``wrap(host)`` is the command prefix that runs a program on that host;
    ``address(host)`` its address on the test subnet."""

    def __init__(self, workers: tuple[str, ...] = ("a", "b")) -> None:
        self.workers = workers
        self._tag = f"{PREFIX}{os.getpid()}"
        self.made: list[str] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def ns(self, host: str) -> str:
        return f"{self._tag}-{host}"

    def wrap(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host)]

    def address(self, host: str) -> str:
        return ROUTER_IP if host == "r" else f"{SUBNET}.{2 + self.workers.index(host)}"

    def _build(self) -> None:
        for host in ("r", *self.workers):
            _ip("netns", "add", self.ns(host))
            self.made.append(self.ns(host))
            _ip("-n", self.ns(host), "link", "set", "lo", "up")
        r = self.ns("r")
        _ip("-n", r, "link", "add", "br0", "type", "bridge")
        _ip("-n", r, "addr", "add", f"{ROUTER_IP}/24", "dev", "br0")
        _ip("-n", r, "link", "set", "br0", "up")
        for host in self.workers:
            ns = self.ns(host)
            _ip("link", "add", "eth0", "netns", ns, "type", "veth",
                "peer", "name", f"to_{host}", "netns", r)
            _ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", r, "link", "set", f"to_{host}", "master", "br0")
            _ip("-n", r, "link", "set", f"to_{host}", "up")

    def link(self, host: str, up: bool) -> None:
        """Cut (``up=False``) or restore ``host``'s link at the router host's end, as a
        pulled cable or a dead switch port would: nothing is sent or answered, no
        connection is reset."""
        _ip("-n", self.ns("r"), "link", "set", f"to_{host}", "up" if up else "down")

    def lose(self, host: str, percent: int) -> None:
        """Drop ``percent`` of the packets in and out of ``host``'s link (nftables'
        ``numgen random``), loopback untouched: TCP sees real loss and retransmits."""
        rules = (
            "table inet wploss {\n"
            f" chain in {{ type filter hook input priority 0; iifname \"eth0\" "
            f"numgen random mod 100 < {percent} drop; }}\n"
            f" chain out {{ type filter hook output priority 0; oifname \"eth0\" "
            f"numgen random mod 100 < {percent} drop; }}\n"
            "}\n")
        subprocess.run([*self.wrap(host), "nft", "-f", "-"], input=rules, text=True,
                       check=True, capture_output=True, timeout=10)

    def close(self) -> None:
        """Remove every namespace made (their veths and bridge go with them). A process
        still inside one keeps its stack alive until it exits: stop processes first."""
        for name in reversed(self.made):
            _ip("netns", "del", name, check=False)
        self.made.clear()

    def left(self) -> list[str]:
        """Namespaces of this run still present (none after ``close``)."""
        names = _ip("netns", "list", check=False).stdout.split()
        return [n for n in names if n.startswith(self._tag + "-")]


@dataclass
class Cluster:
    """A router on host r, a node (supervisor and its workers) on each worker host, as
    processes of a ``tests.conftest.Processes`` (which stops them)."""

    procs: object
    hosts: Hosts
    config: str
    keys: str
    router: object = None

    @property
    def frontend(self) -> str:
        return self.procs.ipc("front")

    @property
    def backend(self) -> str:
        return f"tcp://{ROUTER_IP}:{BACKEND_PORT}"

    def client(self, **kw) -> Client:
        return Client(self.frontend, keys=self.keys, **kw)

    def start_router(self):
        self.router = self.procs.spawn(
            ["router", "--frontend", self.frontend, "--backend", self.backend,
             "--keys", self.keys, "--config", self.config],
            self.frontend, None, wrap=self.hosts.wrap("r"))
        self.router.client = {"keys": self.keys}
        return self.router

    def start_node(self, host: str, *args: str, via: str | None = None):
        """``workerpool worker --node HOST`` on ``host``, pointed at the router's backend
        or at ``via`` (a relay on that host)."""
        return self.procs.spawn(
            ["worker", "--router", via or self.backend, "--node", host, "--keys", self.keys,
             "--config", self.config, "--handler", HANDLER, "--workers", "2", *args],
            self.frontend, "workerpool worker ready", wrap=self.hosts.wrap(host))

    def start_relay(self, host: str, delay: float):
        """tests/relay.py on ``host``: its programs' path to the router, ``delay`` seconds
        each way. Returns the address to give them."""
        self.procs.spawn(["--listen", f"127.0.0.1:{RELAY_PORT}", "--to",
                          f"{ROUTER_IP}:{BACKEND_PORT}", "--delay", str(delay)],
                         self.frontend, "relay ready", wrap=self.hosts.wrap(host),
                         module="tests.relay")
        return f"tcp://127.0.0.1:{RELAY_PORT}"

    def counters(self) -> dict:
        return self.router.status()["router"]["counters"]


@dataclass
class Driven:
    """What ``drive`` measured: requests a second, each result, each latency (seconds)."""

    rate: float
    results: list
    latencies: list[float]


def drive(client: Client, n: int, outstanding: int, seconds: float) -> Driven:
    """``n`` calls of ``where`` (sleeping ``seconds``), a new one as soon as any of
    ``outstanding`` is answered, so a slow host's requests never hold up the rest."""
    room = threading.Semaphore(outstanding)
    latencies: list[float] = []

    def timed(sent: float):
        def done(_) -> None:
            latencies.append(time.monotonic() - sent)
            room.release()
        return done

    t0 = time.monotonic()
    futures = []
    for _ in range(n):
        room.acquire()
        sent = time.monotonic()
        f = client.submit("where", {"seconds": seconds})
        f.add_done_callback(timed(sent))
        futures.append(f)
    results = [f.result(30) for f in futures]
    return Driven(n / (time.monotonic() - t0), results, latencies)
