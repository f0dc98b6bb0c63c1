"""bin/gpu_check.py, the GPU check's runner, on the CPU: which section runs each GPU test, how
a section is judged from pytest's own report, the batching figure's verdict, the deadline,
and one real run here, where no GPU test may pass for a check that passes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest

from tests.conftest import ROOT, _env

_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bin" / "gpu_check.py")
gc = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gc  # dataclasses look their module up there
_spec.loader.exec_module(gc)


def _collect_gpu_tests() -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                          "no:cacheprovider", "-m", "gpu", "tests/"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return gc.parse_collected(out.stdout)


def test_every_gpu_test_has_its_section():
    pytest.importorskip("torch", reason="test_gpu_handlers is collected only with torch")
    ids = _collect_gpu_tests()
    groups = gc.plan(ids)
    assert sorted(t for ts in groups.values() for t in ts) == sorted(ids)  # each exactly once
    assert groups[gc.OTHER] == [], "a new GPU test: give it a section in bin/gpu_check.py"
    for key, _, _ in gc.GPU_SECTIONS:
        assert groups[key], f"section {key} has no test"
    assert groups["poisoned"] == [
        "tests/test_gpu.py::test_real_poisoned_context_is_replaced[poison]",
        "tests/test_gpu.py::test_real_poisoned_context_is_replaced[torch_assert]",
        "tests/test_gpu_handlers.py::test_real_device_assert_in_a_batch_answers_each_caller_"
        "and_replaces_the_worker"]
    assert "tests/test_gpu_handlers.py::test_real_oom_in_a_batch_fails_each_caller_and_keeps_" \
           "the_worker" in groups["oom"]


def test_plan_puts_unknown_tests_in_other():
    groups = gc.plan(["tests/test_new.py::test_something_new", "tests/test_gpu.py::test_oom_x"])
    assert groups[gc.OTHER] == ["tests/test_new.py::test_something_new"]
    assert groups["oom"] == ["tests/test_gpu.py::test_oom_x"]


def _junit(tmp_path, body: str) -> tuple[int, gc.Counts]:
    """Run a real pytest over ``body`` and read its junit report as the runner does."""
    (tmp_path / "test_sample.py").write_text(textwrap.dedent(body))
    xml = tmp_path / "r.xml"
    rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         f"--junitxml={xml}", str(tmp_path / "test_sample.py")],
                        cwd=tmp_path, capture_output=True, timeout=60).returncode
    return rc, gc.junit_counts(str(xml))


def test_verdict_from_a_real_report(tmp_path):
    rc, c = _junit(tmp_path, """
        import pytest
        def test_a(): pass
        def test_b(): assert 1 == 2, "wrong"
        def test_c(): pytest.skip("no CUDA device here")
        @pytest.fixture
        def broken(): raise RuntimeError("fixture broke")
        def test_d(broken): pass
    """)
    assert (c.passed, c.failed, c.errors, c.skipped) == (1, 1, 1, 1)
    ok, detail = gc.pytest_verdict(rc, c)
    assert not ok and detail.startswith("1 passed, 1 failed, 1 errors, 1 skipped")
    assert any(p.startswith("SKIPPED") and "no CUDA device here" in p for p in c.problems)
    assert any(p.startswith("FAILED") and "test_b" in p for p in c.problems)


def test_a_skip_fails_the_section(tmp_path):
    rc, c = _junit(tmp_path, """
        import pytest
        def test_a(): pass
        def test_c(): pytest.skip("CuPy is not installed")
    """)
    assert rc == 0
    ok, detail = gc.pytest_verdict(rc, c)
    assert not ok and "a skip on the GPU machine is a failure" in detail


def test_clean_pass_no_tests_and_timeouts(tmp_path):
    rc, c = _junit(tmp_path, "def test_a(): pass\ndef test_b(): pass\n")
    assert gc.pytest_verdict(rc, c) == (True, "2 passed")
    assert gc.pytest_verdict(5, gc.Counts()) == (False, "no test ran")
    assert gc.pytest_verdict(1, None)[0] is False
    assert gc.pytest_verdict(0, c, timed_out=True) == (False, "timed out (interrupted at the "
                                                           "deadline)")


def _figure(tmp_path, errors=0, speedup=3.5):
    path = tmp_path / "b.json"
    path.write_text(json.dumps({
        "model": {"device": "cuda:0"}, "speedup": speedup,
        "results": {"unbatched": {"req_per_s": 2000.0, "mean_batch_size": 1.0, "errors": 0},
                    "batched": {"req_per_s": 7000.0, "mean_batch_size": 11.2,
                                "errors": errors}}}))
    return str(path)


def test_bench_verdict(tmp_path):
    ok, line = gc.bench_verdict(0, _figure(tmp_path))
    assert ok and line == ("unbatched 2,000 req/s, batched 7,000 req/s (mean batch 11.2), "
                           "speed-up 3.50x on cuda:0")
    assert gc.bench_verdict(1, _figure(tmp_path, errors=3))[1].endswith("3 request(s) failed")
    assert gc.bench_verdict(2, str(tmp_path / "missing.json"))[0] is False
    assert gc.bench_verdict(0, _figure(tmp_path), timed_out=True)[0] is False


def test_a_section_past_its_deadline_is_interrupted(tmp_path):
    console = gc.Console(str(tmp_path / "console.log"))
    code = ("import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
            "    print('cleaned up', flush=True)\n    raise SystemExit(130)\n")
    t0 = time.monotonic()
    rc, timed_out = gc.run_logged([sys.executable, "-c", code], str(tmp_path / "s.log"),
                                  time.monotonic() + 1, console)
    console.close()
    assert timed_out and rc == 130 and time.monotonic() - t0 < 20
    assert "cleaned up" in (tmp_path / "s.log").read_text()  # SIGINT: fixtures get to run


def test_summary_and_exit_status():
    results = [gc.Result("device", True, "a CUDA device is visible", 1.0),
               gc.Result("oom", False, "1 passed, 1 failed", 20.0,
                         ["FAILED tests/test_gpu.py::test_x: boom"])]
    lines = gc.summary_lines(results, 21.0)
    assert lines[0].startswith("PASS  device") and lines[1].startswith("FAIL  oom")
    assert "oom: FAILED tests/test_gpu.py::test_x: boom" in lines[2]
    assert lines[-1] == "gpu-check: FAIL (1/2 sections) in 21s"
    assert gc.summary_lines(results[:1], 1.0)[-1].startswith("gpu-check: PASS")


def test_a_run_without_a_gpu_fails_and_leaves_its_files(tmp_path):
    """The real runner here: it must not pass where every GPU test skips, and it writes the
    summary, its log and every section's log under $OUT."""
    env = {**_env(), "OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "bin/gpu_check.py", "placement"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    assert "FAIL  device" in summary and "no usable CUDA device" in summary
    assert "PASS  collect" in summary
    assert "FAIL  placement       3 skipped (a skip on the GPU machine is a failure" in summary
    assert summary.rstrip().splitlines()[-1].startswith("gpu-check: FAIL")
    assert "== summary" in (tmp_path / "gpu-check.log").read_text()
    with tarfile.open(tmp_path / "gpu-check-logs.tar.gz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
    assert {"device.log", "collect.log", "placement.log", "placement.xml"} <= names


def test_out_of_time_sections_are_reported_not_run(tmp_path):
    env = {**_env(), "OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "bin/gpu_check.py", "--budget", "40", "oom"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    summary = (tmp_path / "summary.txt").read_text()
    assert "FAIL  device          not run: out of time" in summary
