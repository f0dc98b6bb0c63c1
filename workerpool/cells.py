"""How the figures of a STATUS reply print (docs/protocol.md, section 6): one cell per
value, shared by ``workerpool status`` and its live view (``--watch``), so both read the
same. An empty value prints as ``-``."""

from __future__ import annotations

from typing import Any


def cell(value: Any, column: str, row: dict) -> str:
    """The cell of worker ``row``'s field ``column``, whose value is ``value``."""
    if column == "memory":
        return memory(value or {})
    if column == "batch":
        return mean_batch(row.get("batches") or {})
    if value is None:
        return "-"
    if column == "in_flight" and row.get("capacity") is not None:
        ahead = f"+{row['prefetch']}" if row.get("prefetch") else ""
        return f"{value}/{row['capacity']}{ahead}"  # one stuck at its limit stands out
    if column == "uptime":
        return f"{value:.1f}s"
    if column == "utilization":
        return percent(value)
    return str(value)


def mean_batch(batches: dict) -> str:
    """The mean size of the batches a worker's ``@batched`` methods ran, all methods together."""
    count = sum(f["count"] for f in batches.values())
    return f"{sum(f['sum'] for f in batches.values()) / count:.1f}" if count else "-"


def memory(mem: dict) -> str:
    """GPU memory held by the worker's allocator (and the device's size), else its RSS."""
    if "gpu_reserved" in mem:
        total = f"/{size(mem['gpu_total'])}" if "gpu_total" in mem else ""
        return f"{size(mem['gpu_reserved'])}{total} gpu"
    return f"{size(mem['rss'])} rss" if "rss" in mem else "-"


def size(n: int) -> str:
    """Bytes in powers of 1024: ``39.6M``."""
    for unit, step in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= step:
            return f"{n / step:.1f}{unit}"
    return f"{n}B"


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def router_line(r: dict) -> str:
    """The router map (6.1) in one line: pid, uptime, address, clients, draining."""
    return (f"router pid {r['pid']} up {r['uptime']:.0f}s at {r['frontend']}"
            + (f" clients {r['clients']}" if "clients" in r else "")
            + (f" cut off {r['clients_cut_off']}" if r.get("clients_cut_off") else "")
            + (" (draining)" if r["draining"] else ""))


def error_line(text: str | None, width: int | None = None) -> str:
    """The last non-empty line of a ``last_error`` (its exception, for a traceback), cut
    to ``width`` characters with ``…`` when longer; ``-`` when there is none."""
    lines = (text or "").strip().splitlines()
    if not lines:
        return "-"
    line = lines[-1].strip()
    if width is not None and len(line) > width:
        line = line[:max(0, width - 1)] + "…"
    return line


NODE_HEADERS = ("NODE", "HOST", "PID", "STATE", "WORKERS", "SEEN", "RTT ms", "SRTT ms")
"""The columns of the nodes table (docs/protocol.md 6.5): ``WORKERS`` is registered
workers of its slots, ``SEEN`` how long ago the router last heard from it."""


def node_cells(n: dict) -> tuple[str, ...]:
    """The cells of one node (a ``nodes`` entry), in NODE_HEADERS order."""
    return (n["node"], n.get("host") or "-", "-" if n.get("pid") is None else str(n["pid"]),
            n["state"], f"{n['workers']}/{n['slots']}", f"{n['seen']:.1f}s",
            ms(n.get("rtt_ms")), ms(n.get("rtt_smoothed_ms")))
