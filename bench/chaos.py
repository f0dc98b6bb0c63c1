#!/usr/bin/env python3
"""The chaos test, longer: sustained load while workers are SIGKILLed, SIGSTOPped and
poisoned and the router is killed once; prints requests sent, faults injected, replies by
kind, requests left without a reply, duplicate replies and the time back to full strength.

    .venv/bin/python bench/chaos.py --seconds 60 --rate 200
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import Processes  # noqa: E402  (the fixture that owns every process)
from tests.test_chaos import run_chaos  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="load duration")
    ap.add_argument("--rate", type=float, default=200.0, help="requests per second offered")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args()
    procs = Processes()
    try:
        report = run_chaos(procs, args.seconds, args.rate, args.seed)
    finally:
        procs.cleanup()
    report.pop("final_status", None)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"requests sent:          {report['sent']}")
        print(f"faults injected:        {report['faults']}")
        print(f"replies by kind:        {report['outcomes']}")
        print(f"without a reply:        {report['unanswered']}")
        print(f"duplicate replies:      {report['duplicates']}")
        print(f"full strength after:    {report['full_strength_after_s']} s after the load ended")
    ok = report["unanswered"] == 0 and report["duplicates"] == 0 and report["up_running"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
