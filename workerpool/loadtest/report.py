"""The result of a run: one JSON-able report (``--json``, schema in docs/operations.md),
and the human summary printed from it.

::

    Recording (merged) + fault results + status samples --> build() --> report dict
    report dict --> format_summary() | json.dumps() | plot.render()

Everything a person or a script reads comes from the report dict, so the summary, the
JSON and the plot never disagree.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from workerpool.loadtest.recorder import BUCKET_DIGITS, Recording, new_histogram, summarize
from workerpool.loadtest.spec import LoadSpec

SCHEMA_VERSION = 1
EXIT_OK = 0
EXIT_UNANSWERED = 3  # some request got no reply (errors are replies: they exit 0)
RATE_SHORTFALL = 0.97  # open loop: sending below this share of --rate is reported
LAG_WARNING_MS = 100.0  # the generator this late sending some request is reported
BASELINE_MIN = 20  # requests before the first fault needed to judge latency recovery


def build(spec: LoadSpec, seed: int, rec: Recording, *, faults: list[dict],
          serving: list[tuple[float, int, int, float | None]], known_workers: list[str],
          started_at: str,
          elapsed: float, interrupted: bool, notes: list[str]) -> dict[str, Any]:
    """The report of one run (schema_version 1)."""
    c = rec.counts
    measured = c["sent"] - c["warmup"]
    window = _window(spec, rec)
    ok_rps = c["ok"] / window if window else None
    sent_rps = measured / window if window else None
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "started_at": started_at,
        "elapsed_s": round(elapsed, 3),
        "interrupted": interrupted,
        "config": _config(spec, seed),
        "requests": {"sent": c["sent"], "warmup": c["warmup"], "measured": measured,
                     "ok": c["ok"], "errors": c["errors"], "unanswered": c["unanswered"],
                     "unanswered_in_warmup": c["unanswered_warmup"], "unsent": c["unsent"]},
        "throughput": {"window_s": _r(window), "offered_rps": spec.rate,
                       "sent_rps": _r(sent_rps), "ok_rps": _r(ok_rps)},
        "latency_ms": summarize(rec.latency),
        "latency_from": "intended" if spec.mode == "open" else "send",
        "error_latency_ms": summarize(rec.error_latency),
        "send_lag_ms": summarize(rec.send_lag) if spec.mode == "open" else None,
        "errors": dict(sorted(rec.errors.items())),
        "unanswered": dict(sorted(rec.unanswered.items())),
        "methods": {m: {"ok": rec.method_latency(m).get_total_count(),
                        "errors": rec.method_errors[m],
                        "latency_ms": summarize(rec.method_latency(m))} for m in rec.methods},
        "workers": _workers(rec, known_workers),
        "faults": faults,
        "utilization": _utilization(serving, spec.warmup),
        "timeline": _timeline(rec, serving),
        "warnings": [],
    }
    report["balance"] = _balance(report["workers"])
    _service_recovery(report, rec, spec)
    report["warnings"] = _warnings(report, spec, rec, notes, interrupted)
    report["exit_status"] = EXIT_UNANSWERED if c["unanswered"] else EXIT_OK
    return report


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def _config(spec: LoadSpec, seed: int) -> dict[str, Any]:
    return {
        "router": spec.router, "mode": spec.mode, "rate": spec.rate,
        "arrival": spec.arrival if spec.mode == "open" else None,
        "concurrency": spec.concurrency, "duration_s": spec.duration,
        "requests": spec.requests, "warmup_s": spec.warmup, "timeout_s": spec.timeout,
        "priority": spec.priority, "idempotent": spec.idempotent, "procs": spec.procs,
        "methods": [{"service": m.service, "method": m.method, "weight": m.weight}
                    for m in spec.methods],
        "payload": {"kind": spec.body_kind, "size_bytes": spec.payload_size},
        "inject": [{"kind": f.kind, "at_s": f.at} for f in spec.faults],
        "seed": seed, "interval_s": spec.bucket(),
    }


def _window(spec: LoadSpec, rec: Recording) -> float | None:
    """Seconds the measured requests were offered over: --duration, or with --requests
    from the end of the warm-up to the last reply."""
    if spec.duration is not None:
        return spec.duration
    if rec.last_done is None:
        return None
    start = max(spec.warmup, rec.first_send or 0.0)
    return max(rec.last_done - start, 1e-6)


def _workers(rec: Recording, known: list[str]) -> dict[str, dict[str, Any]]:
    total = sum(rec.workers.values())
    names = sorted(set(known) | set(rec.workers), key=_slot_key)
    return {w: {"replies": rec.workers[w],
                "share": round(rec.workers[w] / total, 4) if total else 0.0} for w in names}


def _slot_key(slot: str) -> tuple:
    head, _, index = slot.rpartition("/")
    return (head, int(index)) if index.isdigit() else (slot, -1)


def _balance(workers: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """How evenly the policy spread the replies: max/mean and the coefficient of
    variation of the per-worker counts (0 is perfectly even)."""
    counts = [w["replies"] for w in workers.values()]
    if not counts or not sum(counts):
        return None
    mean = statistics.fmean(counts)
    return {"workers": len(counts), "min_share": min(w["share"] for w in workers.values()),
            "max_share": max(w["share"] for w in workers.values()),
            "max_over_mean": round(max(counts) / mean, 3),
            "cv": round(statistics.pstdev(counts) / mean, 3)}


def _utilization(serving: list[tuple[float, int, int, float | None]],
                 warmup: float) -> dict[str, float] | None:
    """The serving workers' busy fraction (status ``utilization``) over the measured part
    of the run, from the status polls: how much of the pool's time the handlers ran."""
    util = [u for t, _, _, u in serving if u is not None and t >= warmup]
    if not util:
        return None
    return {"mean": round(statistics.fmean(util), 3), "min": min(util), "max": max(util),
            "samples": len(util)}


def _timeline(rec: Recording, serving: list[tuple[float, int, int, float | None]]
              ) -> dict[str, Any]:
    b = rec.bucket
    last = max(rec.timeline, default=-1)
    out: dict[str, list] = {k: [] for k in ("t", "sent", "ok", "errors", "unanswered", "failed",
                                            "ok_rps", "p50_ms", "p90_ms", "p99_ms", "max_ms")}
    for k in range(last + 1):
        bk = rec.timeline.get(k)
        out["t"].append(round(k * b, 3))
        out["sent"].append(bk.sent if bk else 0)
        out["ok"].append(bk.ok if bk else 0)
        out["errors"].append(bk.errors if bk else 0)
        out["unanswered"].append(bk.unanswered if bk else 0)
        out["failed"].append(bk.failed if bk else 0)
        out["ok_rps"].append(round((bk.ok if bk else 0) / b, 3))
        s = summarize(bk.latency) if bk else None
        for p in ("p50", "p90", "p99", "max"):
            out[f"{p}_ms"].append(s[p] if s else None)
    return {"interval_s": b, **out,
            "workers_serving": [[t, n, slots] for t, n, slots, _ in serving],
            "utilization": [[t, u] for t, _, _, u in serving if u is not None]}


def _service_recovery(report: dict, rec: Recording, spec: LoadSpec) -> None:
    """Per fault, ``service_recovered_s``: from the injection to the end of the first
    stretch of consecutive bad timeline intervals that begins in the injection's interval
    or the next one (0 when neither is bad); and ``errors_during``: the errors and
    requests without a reply in the intervals from the injection until both the latency
    and the pool were back (or the next fault). An interval is bad when the p99 of the
    requests meant to be sent in it is above the threshold, or one of them failed (an
    error or no reply). The
    threshold is max(3 x baseline p99, baseline p99 + 10 ms), the baseline being the
    requests meant to be sent after the warm-up and before the first fault."""
    faults = [f for f in report["faults"] if f.get("injected_at_s") is not None]
    for f in report["faults"]:
        f.setdefault("service_recovered_s", None)
        f.setdefault("errors_during", None)
    if not faults:
        return
    b = rec.bucket
    first = faults[0]["injected_at_s"]
    base = new_histogram(BUCKET_DIGITS)
    for k, bk in rec.timeline.items():
        if k * b >= spec.warmup and (k + 1) * b <= first:
            base.add(bk.latency)
    if base.get_total_count() < BASELINE_MIN:
        report.setdefault("notes", []).append(
            f"latency recovery not judged: fewer than {BASELINE_MIN} requests before the "
            f"first fault (at {first:g}s) to take a baseline from")
        return
    p99 = base.get_value_at_percentile(99) / 1e3
    threshold = max(3 * p99, p99 + 10.0)
    report["recovery_threshold_ms"] = round(threshold, 3)

    def bad(k: int) -> bool:
        bk = rec.timeline.get(k)
        if bk is None:
            return False
        slow = bk.latency.get_total_count() and (
            bk.latency.get_value_at_percentile(99) / 1e3 > threshold)
        return bool(slow or bk.failed)

    last = (max(rec.timeline, default=0) + 1) * b
    for i, f in enumerate(faults):
        start = f["injected_at_s"]
        k0 = math.floor(start / b)
        k = k0 if bad(k0) else k0 + 1
        end = None
        while bad(k):
            end = k
            k += 1
        f["service_recovered_s"] = 0.0 if end is None else round((end + 1) * b - start, 3)
        # Errors while the fault lasted: replies by completion time (a crash is answered
        # when the pool notices it) from the injection until both the latency and the
        # pool were back, or until the next fault.
        until = start + f["service_recovered_s"]
        back = f.get("pool_recovered_s")
        until = max(until, start + back) if back is not None else last
        if i + 1 < len(faults):
            until = min(until, faults[i + 1]["injected_at_s"])
        f["errors_during"] = sum(rec.timeline[j].errors + rec.timeline[j].unanswered
                                 for j in range(k0, max(k0 + 1, math.ceil(until / b)))
                                 if j in rec.timeline)


def _warnings(report: dict, spec: LoadSpec, rec: Recording, notes: list[str],
              interrupted: bool) -> list[str]:
    out = list(notes) + report.pop("notes", [])
    req, thr = report["requests"], report["throughput"]
    if interrupted:
        out.append(f"interrupted after {report['elapsed_s']:g}s: the figures cover what ran")
    if spec.rate is not None and thr["sent_rps"] is not None and not interrupted and (
            req["unsent"] or thr["sent_rps"] < RATE_SHORTFALL * spec.rate):
        out.append(f"offered rate not reached: {thr['sent_rps']:,.1f}/s sent of "
                   f"{spec.rate:,.1f}/s ({req['unsent']} scheduled requests never sent); "
                   f"the load generator fell behind: try --procs")
    lag = report["send_lag_ms"]
    if lag and lag["max"] > LAG_WARNING_MS:
        out.append(f"the load generator sent a request up to {lag['max']:,.1f} ms late "
                   f"(p99 {lag['p99']:,.2f} ms): those delays are in the latencies")
    if req["measured"] and not req["ok"] and req["errors"]:
        first = max(report["errors"].items(), key=lambda kv: kv[1])[0]
        out.append(f"every measured request failed (mostly {first})")
    if req["unanswered"]:
        out.append(f"{req['unanswered']} request(s) got no reply: exit status {EXIT_UNANSWERED}")
    for f in report["faults"]:
        if f.get("error"):
            out.append(f"fault {f['kind']}:{f['at_s']:g}s not injected: {f['error']}")
    return out


# -- the human summary ----------------------------------------------------------------------------
def format_summary(r: dict[str, Any]) -> str:
    """The report as a few aligned lines for a terminal."""
    cfg, req, thr = r["config"], r["requests"], r["throughput"]
    mix = ", ".join(f"{(m['service'] + ':') if m['service'] else ''}{m['method']}"
                    + (f" x{m['weight']:g}" if len(cfg["methods"]) > 1 else "")
                    for m in cfg["methods"])
    if cfg["mode"] == "open":
        mode = f"open loop, {cfg['rate']:,.1f} req/s {cfg['arrival']}"
    else:
        mode = f"closed loop, {cfg['concurrency']} outstanding"
    span = (f"{cfg['duration_s']:g}s" if cfg["duration_s"] is not None
            else f"{cfg['requests']:,} requests")
    if cfg["warmup_s"]:
        span += f" after {cfg['warmup_s']:g}s warm-up"
    lines = [f"workerpool loadtest: {mode}, {span}, {cfg['procs']} process(es), {mix} "
             f"-> {cfg['router']}"]
    lines.append(f"requests    {req['measured']:,} measured: {req['ok']:,} ok, {req['errors']:,} "
                 f"errors, {req['unanswered']:,} without a reply"
                 + (f" ({req['warmup']:,} more in warm-up)" if req["warmup"] else ""))
    tp = f"throughput  {_num(thr['ok_rps'])} ok/s"
    if thr["offered_rps"] is not None:
        tp += f" (offered {thr['offered_rps']:,.1f}/s, sent {_num(thr['sent_rps'])}/s)"
    lines.append(tp)
    lat = r["latency_ms"]
    if lat:
        frm = "intended send time" if r["latency_from"] == "intended" else "send"
        lines.append(f"latency ms  p50 {_ms(lat['p50'])}  p90 {_ms(lat['p90'])}  p99 "
                     f"{_ms(lat['p99'])}  p99.9 {_ms(lat['p99.9'])}  max {_ms(lat['max'])}  "
                     f"mean {_ms(lat['mean'])}   (ok replies, from the {frm})")
    if len(r["methods"]) > 1:
        for m, s in r["methods"].items():
            ml = s["latency_ms"]
            lines.append(f"  {m:<16} {s['ok']:,} ok, {s['errors']:,} errors"
                         + (f", p50 {_ms(ml['p50'])} p99 {_ms(ml['p99'])} ms" if ml else ""))
    if r["errors"]:
        lines.append("errors      " + ", ".join(f"{k} {v:,}" for k, v in r["errors"].items()))
    if r["unanswered"]:
        lines.append("no reply    " + ", ".join(f"{k} {v:,}" for k, v in r["unanswered"].items()))
    if r["workers"]:
        shares = "  ".join(f"{w} {v['share'] * 100:.1f}%" for w, v in r["workers"].items())
        bal = r["balance"]
        lines.append(f"workers     {shares}"
                     + (f"   (max/mean {bal['max_over_mean']:.2f}, cv {bal['cv']:.2f})" if bal else ""))
    if r.get("utilization"):
        u = r["utilization"]
        lines.append(f"utilization {u['mean']:.0%} mean (min {u['min']:.0%}, max {u['max']:.0%}): "
                     "the share of time the serving workers' handlers ran")
    for f in r["faults"]:
        lines.append("fault       " + _fault_line(f))
    for w in r["warnings"]:
        lines.append(f"warning     {w}")
    return "\n".join(lines)


def _fault_line(f: dict[str, Any]) -> str:
    head = f"+{f['at_s']:g}s {f['kind']}"
    if f.get("injected_at_s") is None:
        return f"{head}: not injected ({f.get('error')})"
    out = f"{head} {f['worker']} (pid {f['pid']}) at {f['injected_at_s']:.2f}s: "
    parts = []
    if f.get("detected_s") is not None:
        parts.append(f"noticed after {f['detected_s']:.2f}s")
    if f.get("pool_recovered_s") is not None:
        parts.append(f"back at full strength after {f['pool_recovered_s']:.2f}s")
    else:
        parts.append("not back at full strength by the end of the run")
    if f.get("service_recovered_s") is not None:
        parts.append(f"latency normal after {f['service_recovered_s']:.2f}s")
    if f.get("errors_during") is not None:
        parts.append(f"{f['errors_during']} error(s)")
    if f.get("cause"):
        parts.append(f"router: {f['cause']}")
    return out + ", ".join(parts)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f}"


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.2f}" if x < 1000 else f"{x:,.0f}"
