"""The private folder of a pool's ipc socket, made by ``workerpool up`` when no
``--backend`` is given.

Its name carries its owner's pid namespace and pid, as a shared-memory segment's does
(ipc/shm.py). The ``up`` that made it removes it on the way out; one killed with SIGKILL
takes no way out, so the next ``up`` on the host removes the folders whose owner no longer
runs. A folder whose owner is alive is never touched, even if its socket is gone for a
moment (a router being restarted).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import tempfile

from ipc.shm import PIDNS, process_alive

log = logging.getLogger("workerpool.supervisor")

PREFIX = "workerpool-"
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)-(\d+)-[A-Za-z0-9_]+")


def make() -> str:
    """A new private folder, owned by this process, after sweeping dead owners' ones."""
    swept = sweep()
    if swept:
        log.info("removed %d socket folders of pools killed without cleaning up: %s",
                 len(swept), ", ".join(swept))
    return tempfile.mkdtemp(prefix=f"{PREFIX}{PIDNS}-{os.getpid()}-")


def remove(path: str) -> None:
    """Remove a folder ``make`` returned, and the socket in it."""
    shutil.rmtree(path, ignore_errors=True)


def sweep(root: str | None = None) -> list[str]:
    """Remove this user's folders in ``root`` (the temporary directory) whose owner, a pid
    of this namespace, no longer runs. Returns their paths."""
    root = root or tempfile.gettempdir()
    try:
        names = os.listdir(root)
    except OSError:
        return []
    uid = os.getuid()
    removed = []
    for name in names:
        m = _NAME.fullmatch(name)
        if m is None or int(m.group(1)) != PIDNS:
            continue
        pid = int(m.group(2))
        if pid == os.getpid() or process_alive(pid):
            continue
        path = os.path.join(root, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == uid:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
