"""Without the `loadtest` extra, `workerpool loadtest` says in one line which extra to
install and exits 2, before it sends anything, instead of ending in a traceback.

Each case runs the real command in a fresh interpreter in which importing the named
modules fails, as on a machine where they were never installed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL = "pip install 'workerpool[loadtest]'"

# argv: BLOCKED (comma list of top-level modules), then the workerpool arguments.
BLOCKER = """
import sys

blocked = set(sys.argv[1].split(","))


class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Blocker())
sys.argv = ["workerpool", *sys.argv[2:]]
from workerpool.cli import main

main()
"""


def run_blocked(blocked: str, *args: str) -> subprocess.CompletedProcess:
    # A router nobody listens at: were the check late, the run would wait for it and
    # exit 1 ("no router answered"), not 2.
    return subprocess.run(
        [sys.executable, "-c", BLOCKER, blocked, "loadtest", "--router",
         "ipc:///nonexistent/workerpool-test", "--requests", "1", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=60)


def assert_one_line(out: subprocess.CompletedProcess, line: str) -> None:
    assert (out.returncode, out.stderr.splitlines(), out.stdout) == (2, [line], ""), out.stderr


def test_without_hdrhistogram_one_line_names_the_extra():
    out = run_blocked("hdrh", "--no-progress")
    assert_one_line(out, "Error: workerpool loadtest needs hdrhistogram, which is not "
                         f"installed: {INSTALL}")


@pytest.mark.skipif(importlib.util.find_spec("hdrh") is None,
                    reason="hdrhistogram (the loadtest extra) is not installed")
def test_plot_without_matplotlib_fails_before_the_run(tmp_path):
    png = tmp_path / "run.png"
    out = run_blocked("matplotlib", "--no-progress", "--plot", str(png))
    assert_one_line(out, f"Error: --plot needs matplotlib, which is not installed: {INSTALL}")
    assert not png.exists()


@pytest.mark.skipif(importlib.util.find_spec("hdrh") is None,
                    reason="hdrhistogram (the loadtest extra) is not installed")
def test_progress_bar_without_rich_names_the_extra_and_the_way_around():
    out = run_blocked("rich", "--progress")
    assert_one_line(out, "Error: the progress bar needs rich, which is not installed: "
                         f"{INSTALL} (or --no-progress)")


def test_the_library_entry_point_says_the_same():
    code = ("import sys\n" + BLOCKER.split("sys.argv = ")[0]
            + "import workerpool.loadtest as lt\n"
            + "try:\n    lt.run\nexcept ImportError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code, "hdrh"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.stdout.strip() == ("workerpool.loadtest.run needs hdrhistogram, which is not "
                                  f"installed: {INSTALL}"), out.stderr
