"""bin/gpu-check's runner: every test marked gpu, in named sections, then the batching figure
and the crash suites, on the lent GPU machine, with a PASS/FAIL line per section.

::

    device     nvidia-smi, torch and CuPy see the GPU          (a short python3 -c)
    collect    pytest --collect-only -m gpu tests/             -> test ids, one section each
    sections   one pytest per section, its own log and junit XML, a deadline for each
    batching   bench/batching.py --device cuda                 -> the figure, as text and JSON
    core       tests/test_faults.py, test_dispatch.py, test_cuda_faults.py on this machine
    summary    one line per section; exit 0 only if every section passed

A section passes when its pytest exits 0 with at least one test and none skipped: on the
GPU machine a skip (no CuPy, no device) is a failure of the check. The whole run keeps to
``--budget`` seconds (default 540, inside the device tool's 10 minutes): a section that
would pass the deadline is interrupted (SIGINT, so its fixtures stop their pools) and fails
as timed out, and the summary is still written. Stdlib only: torch is imported by the tests'
processes, never here.

Files under $OUT (else out/gpu-check/; at most 8 come back from the device): gpu-check.log
(everything printed), summary.txt, batching-gpu.txt and batching-gpu.json (the figure), and
gpu-check-logs.tar.gz (each section's log and junit XML).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_TIMEOUT = 150  # seconds per GPU test (pytest-timeout); the tests' own waits are <= 120
GRACE = 30  # seconds a section has to stop after SIGINT before it is killed
RESERVE = 20  # seconds kept back for the summary and the tarball

# (key, what it shows, regex on the test's name): a test goes to the first section it matches.
GPU_SECTIONS: list[tuple[str, str, str]] = [
    ("placement", "workers placed per GPU, CUDA only in workers, GPU memory in status",
     r"placement|workers_per_device|compute_matches_cpu"),
    ("torch-handler", "TorchMLP on CUDA: same model as on the CPU, batched = unbatched",
     r"torch_mlp|torch_handler"),
    ("cupy-handler", "CuPy in workers: a RawKernel, CupyOps", r"cupy"),
    ("cuda-tensors", "a CUDA tensor a handler returns reaches the client on the host",
     r"cuda_tensor"),
    ("oom", "a real OOM is retryable and keeps the worker, alone and in a batch", r"oom"),
    ("poisoned", "a real poisoned context (bad pointer, device-side assert, in a batch) "
                 "replaces the worker", r"poison|device_assert"),
    ("crash", "kill -9 and SIGSEGV of busy GPU workers", r"kill_9|segfault"),
    ("batching-test", "bench/batching.py --device cuda answers every request",
     r"batching_benchmark"),
]
OTHER = "other"
CORE_TESTS = ["tests/test_faults.py", "tests/test_dispatch.py", "tests/test_cuda_faults.py"]
BENCH_ARGS = ["bench/batching.py", "--device", "cuda", "--duration", "3", "--rounds", "3"]

DEVICE_PROBE = r"""
import os, sys
from workerpool.devices import discover_gpus, parse_devices
print(f"python {sys.version.split()[0]}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}")
print(f"discover_gpus: {discover_gpus()}; --devices auto: {parse_devices('auto')}")
ok = bool(discover_gpus())
import importlib.metadata as md
for dist in ("pytest", "pytest-timeout", "msgpack", "click", "pyzmq", "pydantic", "hdrhistogram",
             "rich"):
    try:
        print(f"{dist} {md.version(dist)}", end="; ")
    except md.PackageNotFoundError:
        print(f"{dist} MISSING", end="; ")
        ok = False
print()
try:
    import numpy
    print(f"numpy {numpy.__version__}")
    import torch
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: "
          f"{torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(0)
        print(f"device 0: {torch.cuda.get_device_name(0)}, {total / 2**30:.1f} GiB, "
              f"{free / 2**30:.1f} GiB free")
    else:
        ok = False
except Exception as exc:
    print(f"torch: {type(exc).__name__}: {exc}")
    ok = False
try:
    import cupy
    print(f"cupy {cupy.__version__}, devices: {cupy.cuda.runtime.getDeviceCount()}")
except Exception as exc:
    print(f"cupy: {type(exc).__name__}: {exc} (the CuPy tests will skip, and fail the check)")
sys.exit(0 if ok else 1)
"""


@dataclass
class Result:
    """One section's outcome, as the summary prints it."""

    key: str
    ok: bool
    detail: str
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)  # failed or skipped tests, one line each


@dataclass
class Counts:
    """What a junit XML file says: per-outcome counts and one line per failure or skip."""

    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)


# -- planning and judging (pure: tested on the CPU in tests/test_gpu_check.py) --------------
def parse_collected(text: str) -> list[str]:
    """Test ids from ``pytest --collect-only -q`` output."""
    return [line.strip() for line in text.splitlines() if "::" in line and " " not in line.strip()]


def plan(test_ids: list[str], sections=GPU_SECTIONS) -> dict[str, list[str]]:
    """Each test id in the first section whose regex matches its name; the rest in ``other``
    (run all the same, so a new GPU test is never left out)."""
    out: dict[str, list[str]] = {key: [] for key, _, _ in sections}
    out[OTHER] = []
    for tid in test_ids:
        name = tid.rpartition("::")[2]
        key = next((k for k, _, rx in sections if re.search(rx, name)), OTHER)
        out[key].append(tid)
    return out


def junit_counts(path: str) -> Counts:
    """Outcomes of every test case in a pytest junit XML file."""
    c = Counts()
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        failure, error, skipped = (case.find(t) for t in ("failure", "error", "skipped"))
        if failure is not None:
            c.failed += 1
            c.problems.append(f"FAILED {name}: {_first_line(failure.get('message'))}")
        elif error is not None:
            c.errors += 1
            c.problems.append(f"ERROR {name}: {_first_line(error.get('message'))}")
        elif skipped is not None:
            c.skipped += 1
            c.problems.append(f"SKIPPED {name}: {_first_line(skipped.get('message'))}")
        else:
            c.passed += 1
    return c


def _first_line(text: str | None, limit: int = 200) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line[:limit]


def pytest_verdict(rc: int | None, counts: Counts | None, timed_out: bool = False
                   ) -> tuple[bool, str]:
    """PASS only for a clean exit with tests run and none failed, errored or skipped."""
    if timed_out:
        return False, "timed out (interrupted at the deadline)"
    if counts is None:
        return False, f"pytest exited with {rc} and wrote no report"
    parts = [f"{n} {what}" for n, what in ((counts.passed, "passed"), (counts.failed, "failed"),
                                           (counts.errors, "errors"), (counts.skipped, "skipped"))
             if n]
    detail = ", ".join(parts) or "no test ran"
    if rc == 5 or counts.passed + counts.failed + counts.errors + counts.skipped == 0:
        return False, "no test ran"
    ok = rc == 0 and not (counts.failed or counts.errors or counts.skipped)
    if rc != 0 and not (counts.failed or counts.errors):
        detail += f"; pytest exited with {rc}"
    if counts.skipped and not (counts.failed or counts.errors):
        detail += " (a skip on the GPU machine is a failure of the check)"
    return ok, detail


def bench_verdict(rc: int | None, json_path: str, timed_out: bool = False) -> tuple[bool, str]:
    """The batching figure: PASS when the script exited 0 and every request was answered."""
    if timed_out:
        return False, "timed out (interrupted at the deadline)"
    try:
        with open(json_path) as f:
            out = json.load(f)
        res = out["results"]
        line = (f"unbatched {res['unbatched']['req_per_s']:,.0f} req/s, batched "
                f"{res['batched']['req_per_s']:,.0f} req/s (mean batch "
                f"{res['batched']['mean_batch_size']:.1f}), speed-up "
                f"{out['speedup']:.2f}x on {out['model']['device']}")
        errors = sum(r["errors"] for r in res.values())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return False, f"exited with {rc}; no figure ({type(exc).__name__}: {exc})"
    if errors:
        return False, f"{line}; {errors} request(s) failed"
    if rc != 0:
        return False, f"{line}; exited with {rc}"
    return True, line


def summary_lines(results: list[Result], elapsed: float) -> list[str]:
    lines = [f"{'PASS' if r.ok else 'FAIL'}  {r.key:<15} {r.detail}  [{r.seconds:.0f}s]"
             for r in results]
    for r in results:
        lines += [f"      {r.key}: {p}" for p in r.problems[:20]]
    passed = all(r.ok for r in results) and bool(results)
    lines.append(f"gpu-check: {'PASS' if passed else 'FAIL'} "
                 f"({sum(r.ok for r in results)}/{len(results)} sections) in {elapsed:.0f}s")
    return lines


# -- running ------------------------------------------------------------------------------------
class Console:
    """Prints to stdout and appends to the run's log file."""

    def __init__(self, path: str) -> None:
        self._f = open(path, "w", encoding="utf-8", errors="replace")  # noqa: SIM115
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            sys.stdout.write(text)
            sys.stdout.flush()
            self._f.write(text)
            self._f.flush()

    def line(self, text: str = "") -> None:
        self.write(text + "\n")

    def close(self) -> None:
        self._f.close()


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    # Only the plugin the suite uses: the GPU image has many (jaxtyping, typeguard,
    # hypothesis, xdist, benchmark...) that would load into every pytest and could change it.
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    return env


def run_logged(argv: list[str], log_path: str, deadline: float, console: Console,
               stdout_path: str | None = None) -> tuple[int | None, bool]:
    """Run ``argv`` in the repository, its output to ``log_path`` and the console (stdout
    alone to ``stdout_path`` when given). Past ``deadline`` (monotonic) it gets SIGINT, then
    SIGKILL after GRACE seconds. Returns (exit status, timed out)."""
    with open(log_path, "w", encoding="utf-8", errors="replace") as log:
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        separate = stdout_path is not None
        proc = subprocess.Popen(argv, cwd=ROOT, env=child_env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE if separate else subprocess.STDOUT,
                                text=True, errors="replace")
        sinks = [open(stdout_path, "w", encoding="utf-8") if separate else None]  # noqa: SIM115

        def pump(stream, extra):
            for line in stream:
                log.write(line)
                log.flush()
                console.write(line)
                if extra is not None:
                    extra.write(line)

        pumps = [threading.Thread(target=pump, args=(proc.stdout, sinks[0]), daemon=True)]
        if separate:
            pumps.append(threading.Thread(target=pump, args=(proc.stderr, None), daemon=True))
        for t in pumps:
            t.start()
        timed_out = False
        try:
            proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            console.line(f"\n!! deadline: interrupting {argv[1] if len(argv) > 1 else argv[0]}")
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for t in pumps:
            t.join(5)
        if sinks[0] is not None:
            sinks[0].close()
    return proc.returncode, timed_out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("only", nargs="*", metavar="SECTION",
                    help="run only these sections (device and collect always run)")
    ap.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET", 540)),
                    help="seconds for the whole run (default 540, or $GPU_CHECK_BUDGET)")
    ap.add_argument("--list", action="store_true", help="print the sections and their tests")
    args = ap.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget - RESERVE
    known = [k for k, _, _ in GPU_SECTIONS] + [OTHER, "batching-figure", "core"]
    unknown = sorted(set(args.only) - set(known))
    if unknown:
        ap.error(f"unknown section(s) {unknown}; sections: {', '.join(known)}")

    py = sys.executable
    pytest = [py, "-m", "pytest", "-p", "pytest_timeout", "-p", "no:cacheprovider"]
    collect = [*pytest, "--collect-only", "-q", "-m", "gpu", "tests/"]
    if args.list:
        proc = subprocess.run(collect, cwd=ROOT, env=child_env(), capture_output=True, text=True,
                              timeout=300)
        for key, tests in plan(parse_collected(proc.stdout)).items():
            print(f"{key}: {len(tests)}")
            for tid in tests:
                print(f"    {tid}")
        return proc.returncode

    out_dir = os.environ.get("OUT") or os.path.join(ROOT, "out", "gpu-check")
    os.makedirs(out_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gpu-check-")
    console = Console(os.path.join(out_dir, "gpu-check.log"))
    results: list[Result] = []

    def section(key: str) -> bool:
        return not args.only or key in args.only

    def run_pytest(key: str, t0: float, args: list[str]) -> None:
        """One pytest run as one section: its log, its junit report, its verdict."""
        xml = os.path.join(work, f"{key}.xml")
        rc, to = run_logged([*pytest, *args, f"--junitxml={xml}"],
                            os.path.join(work, f"{key}.log"), deadline, console)
        counts = junit_counts(xml) if os.path.exists(xml) else None
        ok, detail = pytest_verdict(rc, counts, to)
        results.append(Result(key, ok, detail, time.monotonic() - t0,
                              counts.problems if counts else []))

    def begin(key: str, what: str) -> float | None:
        now = time.monotonic()
        if deadline - now < 30:
            results.append(Result(key, False, "not run: out of time"))
            console.line(f"== {key}: not run, {deadline - now:.0f}s left")
            return None
        console.line(f"\n== {key}: {what}")
        return now

    try:
        t0 = begin("device", "the GPU, torch and CuPy as this machine's python3 sees them")
        if t0 is None:
            return 1
        if shutil.which("nvidia-smi"):
            run_logged(["nvidia-smi", "-L"], os.path.join(work, "nvidia-smi.log"),
                       min(deadline, time.monotonic() + 30), console)
        rc, to = run_logged([py, "-c", DEVICE_PROBE], os.path.join(work, "device.log"),
                            min(deadline, time.monotonic() + 120), console)
        results.append(Result("device", rc == 0 and not to,
                              "a CUDA device is visible" if rc == 0 and not to else
                              "no usable CUDA device: every GPU test will skip",
                              time.monotonic() - t0))

        t0 = begin("collect", "the tests marked gpu")
        if t0 is None:
            return 1
        collect_log = os.path.join(work, "collect.log")
        rc, _ = run_logged(collect, collect_log, deadline, console)
        with open(collect_log, encoding="utf-8", errors="replace") as f:
            ids = parse_collected(f.read())
        groups = plan(ids)
        results.append(Result("collect", rc == 0 and bool(ids),
                              f"{len(ids)} GPU tests in {sum(bool(v) for v in groups.values())} "
                              f"sections" if rc == 0 and ids else f"collection failed ({rc})",
                              time.monotonic() - t0))
        titles = {k: what for k, what, _ in GPU_SECTIONS} | {OTHER: "GPU tests no section names"}
        for key, tests in groups.items():
            if not ids or not section(key) or (key == OTHER and not tests):
                continue  # (nothing collected: the collect line says why)
            if not tests:
                results.append(Result(key, False, "no test matched this section"))
                continue
            t0 = begin(key, f"{titles[key]} ({len(tests)} tests)")
            if t0 is None:
                continue
            run_pytest(key, t0, ["-v", "-rfEs", "--timeout", str(TEST_TIMEOUT), *tests])

        if section("batching-figure"):
            t0 = begin("batching-figure", "TorchMLP throughput with and without @batched")
            if t0 is not None:
                js = os.path.join(out_dir, "batching-gpu.json")
                txt = os.path.join(out_dir, "batching-gpu.txt")
                if os.path.exists(js):
                    os.remove(js)
                rc, to = run_logged([py, *BENCH_ARGS, "--json-out", js],
                                    os.path.join(work, "batching-figure.log"), deadline,
                                    console, stdout_path=txt)
                with open(txt, "a") as f:
                    f.write(f"command: python {' '.join(BENCH_ARGS)}\n")
                ok, detail = bench_verdict(rc, js, to)
                results.append(Result("batching-figure", ok, detail, time.monotonic() - t0))

        if section("core"):
            t0 = begin("core", "crash, dispatch and CUDA-classification suites on this machine")
            if t0 is not None:
                run_pytest("core", t0, ["-q", "-rfEs", *CORE_TESTS])
    except KeyboardInterrupt:
        results.append(Result("interrupted", False, "gpu-check was interrupted"))
    finally:
        lines = summary_lines(results, time.monotonic() - start)
        console.line("\n== summary")
        for line in lines:
            console.line(line)
        with open(os.path.join(out_dir, "summary.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with tarfile.open(os.path.join(out_dir, "gpu-check-logs.tar.gz"), "w:gz") as tar:
            tar.add(work, arcname="gpu-check-logs")
        shutil.rmtree(work, ignore_errors=True)
        console.close()
    return 0 if results and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
