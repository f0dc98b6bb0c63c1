"""``--plot FILE.png``: the run over time, so a crash and the recovery show at a glance.

::

    report["timeline"] --> replies/s (ok) with errors and requests without a reply
                       --> latency p50 / p90 / p99 / max (log scale, by intended send time)
                       --> workers serving (status polls)
    report["faults"]   --> a line at each injection, shaded until the pool is back

Drawn from the report dict alone (matplotlib, Agg backend, imported only here).
"""

from __future__ import annotations

from typing import Any

FAULT_COLORS = {"kill": "#d62728", "stop": "#ff7f0e", "restart": "#9467bd"}
# max first and light, so p99 stays visible where an interval has too few requests
# for the two to differ.
LATENCY_STYLES = (("max_ms", "max", "#b0b0b0"), ("p99_ms", "p99", "#ff7f0e"),
                  ("p90_ms", "p90", "#2ca02c"), ("p50_ms", "p50", "#1f77b4"))


def render(report: dict[str, Any], path: str) -> None:
    """Write the picture of ``report`` to ``path`` (PNG, about 1000x750 pixels)."""
    import logging

    from workerpool.loadtest.extra import require

    require("matplotlib", "matplotlib", "the load test's plot")
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # font-cache notices
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    tl = _clip(report)
    b = tl["interval_s"]
    mid = [t + b / 2 for t in tl["t"]]
    fig, (ax_tp, ax_lat, ax_w) = plt.subplots(
        3, 1, sharex=True, figsize=(10, 7.5), gridspec_kw={"height_ratios": [3, 3, 1.3]})

    # Throughput; errors on their own scale so that a single one shows.
    ax_tp.plot(mid, tl["ok_rps"], color="#1f77b4", lw=1.4, label="ok replies/s")
    offered = report["config"]["rate"]
    if offered:
        ax_tp.axhline(offered, color="#555555", ls="--", lw=0.9, label=f"offered {offered:,.0f}/s")
    err_rps = [e / b for e in tl["errors"]]
    lost = [(m, u) for m, u in zip(mid, tl["unanswered"], strict=True) if u]
    if lost:
        ax_tp.scatter([m for m, _ in lost], [0] * len(lost), marker="x", color="black",
                      zorder=5, label="sent, no reply")
    ax_tp.set_ylabel("replies / s")
    peak = max([*tl["ok_rps"], offered or 0, 1])
    ax_tp.set_ylim(0, peak * 1.3)  # room above the line for the fault labels
    handles, labels = ax_tp.get_legend_handles_labels()
    if any(err_rps):
        ax_err = ax_tp.twinx()
        bars = ax_err.bar(mid, err_rps, width=b * 0.9, color="#d62728", alpha=0.85)
        ax_err.set_ylim(0, max(err_rps) * 4)  # the bars fill the lower quarter
        ax_err.set_ylabel("errors / s", color="#d62728")
        ax_err.tick_params(axis="y", colors="#d62728")
        handles.append(bars)
        labels.append(f"errors/s ({sum(tl['errors']):,})")
    ax_tp.legend(handles, labels, loc="lower left", fontsize=8, ncol=4)
    ax_tp.grid(alpha=0.3)

    # Latency percentiles by intended send time.
    for key, label, color in LATENCY_STYLES:
        pts = [(m, v) for m, v in zip(mid, tl[key], strict=True) if v is not None]
        if pts:
            ax_lat.plot([m for m, _ in pts], [v for _, v in pts], color=color,
                        lw=0.9 if key == "max_ms" else 1.3, label=label,
                        marker="." if len(pts) < 40 else None)
    if report.get("recovery_threshold_ms"):
        ax_lat.axhline(report["recovery_threshold_ms"], color="#999999", ls=":", lw=0.9,
                       label="recovery threshold")
    ax_lat.set_yscale("log")
    ax_lat.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax_lat.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax_lat.yaxis.set_minor_formatter(NullFormatter())
    frm = "intended send time" if report["latency_from"] == "intended" else "send time"
    ax_lat.set_ylabel(f"latency ms\n(by {frm})")
    ax_lat.legend(loc="upper left", fontsize=8, ncol=5)
    ax_lat.grid(alpha=0.3, which="both")

    # Workers serving, from the status polls.
    serving = tl["workers_serving"]
    if serving:
        ax_w.step([s[0] for s in serving], [s[1] for s in serving], where="post",
                  color="#2ca02c", lw=1.4)
        top = max(s[2] for s in serving)
        ax_w.set_ylim(-0.2, top + 0.6)
        ax_w.axhline(top, color="#bbbbbb", ls=":", lw=0.8)
    ax_w.set_ylabel("workers\nserving")
    util = tl.get("utilization") or []
    if util:  # the serving workers' busy fraction, on its own 0-100% scale
        ax_u = ax_w.twinx()
        ax_u.plot([u[0] for u in util], [u[1] * 100 for u in util], color="#9467bd", lw=1.2)
        ax_u.set_ylim(0, 105)
        ax_u.set_ylabel("busy %", color="#9467bd")
        ax_u.tick_params(axis="y", colors="#9467bd")
    ax_w.set_xlabel("seconds since the start of the run")
    ax_w.grid(alpha=0.3)

    warmup = report["config"]["warmup_s"]
    for ax in (ax_tp, ax_lat, ax_w):
        if warmup:
            ax.axvspan(0, warmup, color="#dddddd", alpha=0.5, lw=0)
        _mark_faults(ax, report["faults"], label=ax is ax_tp)
    if warmup:
        ax_tp.text(warmup / 2, 0.97, "warm-up", transform=ax_tp.get_xaxis_transform(),
                   ha="center", va="top", fontsize=8, color="#666666")
    ax_w.set_xlim(0, (tl["t"][-1] + b) if tl["t"] else 1.0)
    fig.suptitle(_title(report), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _clip(report: dict[str, Any]) -> dict[str, Any]:
    """The timeline up to the run's planned end: intervals after it hold only the last
    replies and would read as a drop in throughput."""
    tl = report["timeline"]
    cfg = report["config"]
    if cfg["duration_s"] is None:
        return tl
    end = cfg["warmup_s"] + cfg["duration_s"]
    n = sum(1 for t in tl["t"] if t < end - 1e-9)
    return {k: (v[:n] if isinstance(v, list) and k not in ("workers_serving", "utilization")
                else v)
            for k, v in tl.items()}


def _mark_faults(ax: Any, faults: list[dict], label: bool) -> None:
    for f in faults:
        t = f.get("injected_at_s")
        if t is None:
            continue
        color = FAULT_COLORS.get(f["kind"], "black")
        ax.axvline(t, color=color, lw=1.6)
        back = f.get("pool_recovered_s")
        if back is not None:
            ax.axvspan(t, t + back, color=color, alpha=0.12, lw=0)
        if label:
            text = f"{f['kind']} {f['worker']}"
            text += f"\nback in {back:.2f}s" if back is not None else "\nnot back"
            ax.text(t, 0.97, " " + text.replace("\n", "\n "), transform=ax.get_xaxis_transform(),
                    ha="left", va="top", fontsize=8, color=color, fontweight="bold")


def _title(r: dict[str, Any]) -> str:
    cfg, req, lat = r["config"], r["requests"], r["latency_ms"]
    if cfg["mode"] == "open":
        mode = f"open loop {cfg['rate']:,.0f} req/s {cfg['arrival']}"
    else:
        mode = f"closed loop, {cfg['concurrency']} outstanding"
    methods = ", ".join(m["method"] for m in cfg["methods"])
    head = f"workerpool loadtest: {mode}, {methods}"
    if lat:
        head += (f"\np50 {lat['p50']:,.2f} ms  p99 {lat['p99']:,.2f} ms  max {lat['max']:,.1f} ms  |  "
                 f"{req['ok']:,} ok, {req['errors']:,} errors, {req['unanswered']:,} without a reply")
    return head
