"""The private socket folder of `workerpool up`: what the next `up` sweeps, and what it
never touches (the end-to-end case is in test_lifecycle.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from ipc.shm import PIDNS
from workerpool import rundir


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(10)
    return child.pid


def test_make_names_the_owner_and_remove_takes_the_socket_with_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(rundir.tempfile, "tempdir", None)  # read TMPDIR again
    path = rundir.make()
    assert os.path.dirname(path) == str(tmp_path)
    assert os.path.basename(path).startswith(f"workerpool-{PIDNS}-{os.getpid()}-")
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o700)  # only its user may connect
    open(os.path.join(path, "backend"), "w").close()
    rundir.remove(path)
    assert not os.path.exists(path)


def test_sweep_removes_only_folders_of_owners_gone(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = tmp_path / f"workerpool-{PIDNS}-{_dead_pid()}-abc_123"
        dead.mkdir()
        (dead / "backend").touch()
        keep = [
            tmp_path / f"workerpool-{PIDNS}-{os.getpid()}-mine0000",  # this process
            tmp_path / f"workerpool-{PIDNS}-{sleeper.pid}-alive000",  # another, running
            tmp_path / f"workerpool-{PIDNS + 1}-{_dead_pid()}-otherns0",  # another namespace
            tmp_path / "workerpool-oldstyle",  # no owner in its name: never guessed at
        ]
        for path in keep:
            path.mkdir()
        not_a_folder = tmp_path / f"workerpool-{PIDNS}-{_dead_pid()}-afile000"
        not_a_folder.touch()
        assert rundir.sweep(str(tmp_path)) == [str(dead)]
        assert not dead.exists()
        assert all(path.exists() for path in keep) and not_a_folder.exists()
    finally:
        sleeper.kill()
        sleeper.wait(10)


def test_sweep_of_a_missing_root_is_empty(tmp_path):
    assert rundir.sweep(str(tmp_path / "gone")) == []
