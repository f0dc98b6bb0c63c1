"""Shared-memory segments that carry large array buffers between processes on one host.

::

    owner (sender)                                        borrower (receiver)
    SegmentPool.lend(n)                                   SegmentMapper.take(name, gen, n)
      flock EX succeeds: nobody reads it                    open /dev/shm/<name>, flock SH
      gen += 1 in the header; copy data in                  header gen == gen, else stale
      --- handle [name, gen] in the message --->            write taken = gen; array views
                                                            last view dropped -> flock UN
    reused once flock EX succeeds again and the message is done with (taken, finished, lost)

A segment is a file in ``/dev/shm`` named ``wp-<pid namespace>-<owner pid>-<64 random
bits>``. Only its owner creates, rewrites and unlinks it; receivers map it, and hold a shared
``flock`` while any array built on it is alive. Locks die with their process, so a crashed
receiver never pins a segment; names carry the owner's pid, so whoever reaps a crashed
owner (the supervisor, for its workers) unlinks what it left (``unlink_owned_by``). The
random part makes a name a capability: a peer that was not sent it cannot guess it.
docs/protocol.md (section 2.5) is the normative description.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import re
import secrets
import stat
import struct
import threading
import time
import weakref
from collections import OrderedDict
from typing import Any

from ipc.errors import ShmError

SHM_DIR = "/dev/shm"
NAME_RE = re.compile(r"wp-([0-9]{1,20})-([0-9]{1,10})-[0-9a-f]{16}")
MAGIC = b"WPSHM\x00\x00\x01"
HEADER = struct.Struct("<8sQQQ")  # magic, generation, taken generation, data capacity
_GEN_AT, _TAKEN_AT = 8, 16
DATA_OFFSET = 4096  # data starts page-aligned, after the header page
MAX_GEN = 2**64 - 1

POOL_BYTES = 2**30
"""Default upper bound on the bytes of segments one pool keeps (lent and idle together).
A message that would need more travels in ZeroMQ frames instead."""
SEGMENT_GRAIN = 2**20
"""New segments are rounded up to a multiple of this, so slightly different sizes reuse them."""
LOST_GRACE = 60.0
"""Seconds after which a segment lent in a reply that nobody took is taken back: the reply
was dropped (a late reply, a client that left)."""
IDLE_TRIM = 30.0
"""Seconds a segment may sit unused before its owner unlinks it and gives the memory back."""
MAPPER_ENTRIES = 32
"""Segments a receiver keeps mapped between messages, so a reused segment costs no mmap."""
TRIM_INTERVAL = 1.0
"""Seconds between two trims of a ``ShmEndpoint``: often enough for ``IDLE_TRIM``, rare
enough to cost nothing on a busy loop."""


# -- naming and host identity --------------------------------------------------------------
def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


PIDNS = _pid_namespace()
"""This process's pid namespace: a pid in a name (a segment's, a pool's socket folder) is
compared with running processes only within the namespace that wrote it."""
_host_id: str | bool | None = False  # False: not computed yet


def host_id() -> str | None:
    """Who can map this process's segments: same boot, same ``/dev/shm`` mount, same user.

    None when this host has no usable ``/dev/shm`` (then shared memory is never used).
    """
    global _host_id
    if _host_id is False:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot = f.read().strip()
            st = os.stat(SHM_DIR)
            if not stat.S_ISDIR(st.st_mode) or not os.access(SHM_DIR, os.W_OK | os.X_OK):
                raise OSError(f"{SHM_DIR} is not a writable directory")
            raw = f"{boot}:{st.st_dev}:{st.st_ino}:{os.getuid()}"
            _host_id = hashlib.sha256(raw.encode()).hexdigest()[:24]
        except OSError:
            _host_id = None
    return _host_id


def check_name(name: object) -> str:
    """``name`` if it is a segment name of this protocol, else ShmError. Never a path."""
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        raise ShmError(f"shared-memory segment name {name!r:.80} does not match "
                       "wp-<pidns>-<pid>-<16 hex digits>")
    return name


def _path(name: str) -> str:
    return f"{SHM_DIR}/{name}"


def owned_segments(pid: int | None = None) -> list[str]:
    """Names of segments in ``/dev/shm`` owned by ``pid`` (any owner if None) in this pid
    namespace."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return []
    out = []
    for name in names:
        m = NAME_RE.fullmatch(name)
        if m and int(m.group(1)) == PIDNS and (pid is None or int(m.group(2)) == pid):
            out.append(name)
    return out


def unlink_owned_by(pid: int) -> int:
    """Unlink every segment ``pid`` created; for a process that is known to be dead.

    Receivers that still map one keep their memory until they let go of it.
    """
    n = 0
    for name in owned_segments(pid):
        try:
            os.unlink(_path(name))
            n += 1
        except FileNotFoundError:
            pass
    return n


def sweep_dead_owners() -> int:
    """Unlink segments whose owner (a pid of this namespace) no longer runs: what a client
    killed with SIGKILL left behind. Returns how many were removed."""
    owners = {int(NAME_RE.fullmatch(name).group(2)) for name in owned_segments()}
    return sum(unlink_owned_by(pid) for pid in owners if not process_alive(pid))


def process_alive(pid: int, *, group: bool = False) -> bool:
    """Whether process ``pid`` (with ``group``: process group ``pid``) still exists. A zombie
    counts as alive, and so does a process of another user (signal 0 is refused, not lost)."""
    try:
        (os.killpg if group else os.kill)(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def max_capacity(nbytes: int) -> int:
    """The largest segment data capacity an owner lends for an array of ``nbytes``."""
    return max(2 * nbytes, nbytes + SEGMENT_GRAIN)


def _lock_shared(fd: int, patience: float = 0.05) -> bool:
    """SH on a segment. Its owner holds EX only for moments (checking whether the segment
    is free, then bumping its generation), so wait that long; an owner that really reused
    it is caught by the generation check that follows."""
    deadline = time.monotonic() + patience
    while not _try_lock(fd, fcntl.LOCK_SH):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.0005)
    return True


def _try_lock(fd: int, op: int) -> bool:
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


# -- the owner's side ----------------------------------------------------------------------
class _Segment:
    __slots__ = ("capacity", "fd", "finished", "gen", "lent_at", "mm", "name", "tag", "used_at")

    def __init__(self, name: str, fd: int, mm: mmap.mmap, capacity: int) -> None:
        self.name = name
        self.fd = fd
        self.mm = mm
        self.capacity = capacity
        self.gen = 0  # 0: never lent
        self.tag: Any = None  # the request it was lent for (clients); None for replies
        self.finished = True
        self.lent_at = 0.0
        self.used_at = time.monotonic()


class Lease:
    """One segment lent for one message: copy the data into ``data``, send ``handle``."""

    __slots__ = ("data", "handle", "nbytes")

    def __init__(self, name: str, gen: int, data: memoryview, nbytes: int) -> None:
        self.handle = [name, gen]
        self.data = data  # writable, exactly nbytes long, page-aligned
        self.nbytes = nbytes


class SegmentPool:
    """The segments one process (or one Client) owns and lends to receivers on its host.

    Thread-safe. ``close`` unlinks them all; receivers keep what they already mapped.
    """

    def __init__(self, max_bytes: int = POOL_BYTES) -> None:
        self.max_bytes = max_bytes
        self._segs: list[_Segment] = []  # by capacity, smallest first
        self._by_tag: dict[Any, list[_Segment]] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        self.created = 0  # segments created over the pool's life (tests and benchmarks read it)

    @property
    def nbytes(self) -> int:
        """Bytes of segments the pool holds now."""
        return self._bytes

    def names(self) -> list[str]:
        with self._lock:
            return [s.name for s in self._segs]

    def lend(self, nbytes: int, tag: Any = None) -> Lease | None:
        """A segment with room for ``nbytes``, or None when the pool is full or shared memory
        fails (the caller then sends a frame). ``tag`` marks a request whose segments stay
        lent until ``finish(tag)``, because the router may hand the request to another worker
        after one died with it."""
        now = time.monotonic()
        with self._lock:
            if self._closed or os.getpid() != self._pid:
                return None  # closed, or a forked child: the segments are the parent's
            seg = self._reusable(nbytes, now)
            if seg is None:
                seg = self._create(nbytes, now)
                if seg is None:
                    return None
            seg.gen = seg.gen + 1 if seg.gen < MAX_GEN else 1
            struct.pack_into("<Q", seg.mm, _GEN_AT, seg.gen)
            fcntl.flock(seg.fd, fcntl.LOCK_UN)  # taken under EX in _reusable/_create
            seg.tag = tag
            seg.finished = tag is None
            seg.lent_at = seg.used_at = now
            if tag is not None:
                self._by_tag.setdefault(tag, []).append(seg)
            data = memoryview(seg.mm)[DATA_OFFSET:DATA_OFFSET + nbytes]
            return Lease(seg.name, seg.gen, data, nbytes)

    def finish(self, tag: Any) -> None:
        """The request ``tag`` has had its final reply (or was given up): its segments may be
        reused once no receiver holds them."""
        if tag not in self._by_tag:  # most requests lend nothing: skip the lock
            return
        with self._lock:
            for seg in self._by_tag.pop(tag, ()):
                if seg.tag == tag:
                    seg.finished = True

    def unlend(self, lease: Lease) -> None:
        """``lease`` was never sent (the encode failed): its segment is free at once."""
        with self._lock:
            for seg in self._segs:
                if seg.name == lease.handle[0] and seg.gen == lease.handle[1]:
                    if seg.tag is not None:
                        tagged = self._by_tag.get(seg.tag, [])
                        if seg in tagged:
                            tagged.remove(seg)
                    seg.tag = None
                    seg.finished = True
                    struct.pack_into("<Q", seg.mm, _TAKEN_AT, seg.gen)  # as if taken and let go
                    return

    def has(self, tag: Any) -> bool:
        """Whether a request ``tag`` has segments lent."""
        return tag in self._by_tag

    def trim(self, now: float | None = None) -> None:
        """Unlink segments unused for ``IDLE_TRIM`` seconds that nobody holds."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for seg in list(self._segs):
                if now - seg.used_at > IDLE_TRIM and self._free(seg, now):
                    self._drop(seg)

    def close(self) -> None:
        """Unlink and unmap every segment. Receivers keep the memory they mapped."""
        with self._lock:
            self._closed = True
            for seg in list(self._segs):
                self._drop(seg)
            self._by_tag.clear()

    # -- internals (under self._lock) -----------------------------------------------------
    def _free(self, seg: _Segment, now: float) -> bool:
        """Nobody can still need seg's contents: take EX (kept on success) and check."""
        if seg.gen and not seg.finished:
            return False
        if seg.gen and seg.tag is None:
            # A reply's segment: until its receiver has taken it, do not even try the lock.
            # Holding EX for a moment, only to find it untaken, would make a receiver that
            # arrives in that moment see the segment as being rewritten.
            taken = struct.unpack_from("<Q", seg.mm, _TAKEN_AT)[0]
            if taken != seg.gen and now - seg.lent_at <= LOST_GRACE:
                return False
        # Never lent, a finished request, or a reply taken (or lost): free unless a
        # receiver still has arrays on it.
        return _try_lock(seg.fd, fcntl.LOCK_EX)

    def _reusable(self, nbytes: int, now: float) -> _Segment | None:
        limit = max_capacity(nbytes)  # don't spend a huge segment on a small array
        for seg in self._segs:
            if seg.capacity < nbytes:
                continue
            if seg.capacity > limit:
                break
            if self._free(seg, now):
                return seg
        return None

    def _create(self, nbytes: int, now: float) -> _Segment | None:
        size = -(-(DATA_OFFSET + nbytes) // SEGMENT_GRAIN) * SEGMENT_GRAIN
        # Make room: drop idle segments nobody holds, least recently used first.
        for seg in sorted(self._segs, key=lambda s: s.used_at):
            if self._bytes + size <= self.max_bytes:
                break
            if self._free(seg, now):
                self._drop(seg)
        if self._bytes + size > self.max_bytes:
            return None
        name = f"wp-{PIDNS}-{self._pid}-{secrets.token_hex(8)}"
        path = _path(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError:
            return None
        try:
            # Allocate every page now: a full /dev/shm is an OSError here, not a SIGBUS on
            # the first write through the mapping.
            os.posix_fallocate(fd, 0, size)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except (OSError, ValueError):
            os.close(fd)
            os.unlink(path)
            return None
        HEADER.pack_into(mm, 0, MAGIC, 0, 0, size - DATA_OFFSET)
        fcntl.flock(fd, fcntl.LOCK_EX)  # cannot block: nobody else knows the name yet
        seg = _Segment(name, fd, mm, size - DATA_OFFSET)
        self._segs.append(seg)
        self._segs.sort(key=lambda s: s.capacity)
        self._bytes += size
        self.created += 1
        return seg

    def _drop(self, seg: _Segment) -> None:
        self._segs.remove(seg)
        self._bytes -= seg.capacity + DATA_OFFSET
        try:
            os.unlink(_path(seg.name))
        except FileNotFoundError:
            pass
        try:
            seg.mm.close()
        except BufferError:
            pass  # a lease's view is still alive (an encode in progress); the GC unmaps it
        os.close(seg.fd)


# -- the receiver's side -------------------------------------------------------------------
class _Mapping:
    __slots__ = ("capacity", "fd", "ino", "mm", "name", "refs", "stale", "used_at")

    def __init__(self, name: str, fd: int, ino: int, mm: mmap.mmap, capacity: int) -> None:
        self.name = name
        self.fd = fd
        self.ino = ino
        self.mm = mm
        self.capacity = capacity
        self.refs = 0  # live takes: the shared lock is held while > 0
        self.stale = False  # out of the cache; closed when refs drops to 0
        self.used_at = time.monotonic()


class SegmentMapper:
    """Maps segments other processes lend, and keeps them mapped for the next message.

    ``take`` returns a writable uint8 numpy array over the data; the segment stays locked
    (shared) until that array and every view of it are gone. Thread-safe: the release
    runs in whichever thread drops the last view.
    """

    def __init__(self, max_entries: int = MAPPER_ENTRIES) -> None:
        self.max_entries = max_entries
        self._cache: OrderedDict[str, _Mapping] = OrderedDict()
        self._lock = threading.RLock()  # a release may run from a GC inside take()
        self.mapped = 0  # segments mapped over the mapper's life

    def take(self, name: str, gen: int, nbytes: int) -> Any:
        """The ``nbytes`` of segment ``name`` at generation ``gen``, or ShmError."""
        import numpy as np

        check_name(name)
        with self._lock:
            entry = self._entry(name, nbytes)
            if entry.refs == 0 and not _lock_shared(entry.fd):
                raise ShmError(f"segment {name} is being rewritten by its owner: the handle "
                               "is stale")
            try:
                magic, seg_gen, _, _ = HEADER.unpack_from(entry.mm, 0)
                if magic != MAGIC:
                    raise ShmError(f"segment {name} has no workerpool header")
                if seg_gen != gen:
                    raise ShmError(f"segment {name} is at generation {seg_gen}, the handle "
                                   f"names {gen}: it was reused (stale handle)")
                if nbytes > entry.capacity:
                    raise ShmError(f"segment {name} holds {entry.capacity} bytes, the handle "
                                   f"asks for {nbytes}")
            except ShmError:
                if entry.refs == 0:
                    fcntl.flock(entry.fd, fcntl.LOCK_UN)
                raise
            struct.pack_into("<Q", entry.mm, _TAKEN_AT, gen)
            entry.refs += 1
            entry.used_at = time.monotonic()
            base = np.frombuffer(entry.mm, np.uint8, nbytes, DATA_OFFSET)
            weakref.finalize(base, self._release, entry)
            return base

    def trim(self, now: float | None = None) -> None:
        """Unmap segments whose owner unlinked them or that sat unused for ``IDLE_TRIM``:
        a mapping keeps the memory alive after the owner let go of it."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for name, entry in list(self._cache.items()):
                if entry.refs:
                    continue
                if now - entry.used_at > IDLE_TRIM or not self._same_file(entry):
                    self._evict(name)

    def close(self) -> None:
        """Forget every mapping; ones still holding arrays close when those are dropped."""
        with self._lock:
            for name in list(self._cache):
                self._evict(name)

    # -- internals -------------------------------------------------------------------------
    def _entry(self, name: str, nbytes: int) -> _Mapping:
        entry = self._cache.get(name)
        if entry is not None:
            if self._same_file(entry):
                self._cache.move_to_end(name)
                return entry
            self._evict(name)
        path = _path(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise ShmError(f"segment {name} does not exist on this host (its owner released "
                           "it, or runs on another host)") from None
        except OSError as exc:
            raise ShmError(f"segment {name} cannot be opened: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                raise ShmError(f"segment {name} is not a regular file of this user")
            if st.st_size < DATA_OFFSET:
                raise ShmError(f"segment {name} is {st.st_size} bytes, shorter than its header")
            if st.st_size > DATA_OFFSET + max_capacity(nbytes):
                # Owners reuse a segment only for arrays at least half its size; a larger
                # one would make us map (and populate) memory the message does not need.
                raise ShmError(f"segment {name} is {st.st_size} bytes, far larger than the "
                               f"{nbytes} bytes it is said to carry")
            mm = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except ShmError:
            os.close(fd)
            raise
        except (OSError, ValueError) as exc:
            os.close(fd)
            raise ShmError(f"segment {name} cannot be mapped: {exc}") from None
        entry = _Mapping(name, fd, st.st_ino, mm, st.st_size - DATA_OFFSET)
        self._cache[name] = entry
        self.mapped += 1
        while len(self._cache) > self.max_entries:
            victim = next((n for n, e in self._cache.items() if e.refs == 0 and e is not entry),
                          None)
            if victim is None:
                break
            self._evict(victim)
        return entry

    @staticmethod
    def _same_file(entry: _Mapping) -> bool:
        try:
            return os.stat(_path(entry.name)).st_ino == entry.ino
        except OSError:
            return False

    def _evict(self, name: str) -> None:
        entry = self._cache.pop(name)
        entry.stale = True
        if entry.refs == 0:
            self._close(entry)

    @staticmethod
    def _close(entry: _Mapping) -> None:
        try:
            entry.mm.close()
        except BufferError:
            pass  # the last array is still being destroyed; the mapping goes with it
        os.close(entry.fd)
        entry.fd = -1

    def _release(self, entry: _Mapping) -> None:
        with self._lock:
            entry.refs -= 1
            if entry.refs or entry.fd < 0:
                return
            fcntl.flock(entry.fd, fcntl.LOCK_UN)
            if entry.stale:
                # The dying array still holds its buffer: close the fd now (the mapping goes
                # with the array), which is all that keeps the segment's memory.
                os.close(entry.fd)
                entry.fd = -1


# -- both sides in one process -------------------------------------------------------------
class ShmEndpoint:
    """Shared memory as one process (or one Client) uses it: the ``SegmentPool`` it lends
    its outgoing arrays from and the ``SegmentMapper`` that maps incoming ones, trimmed
    together at most every ``TRIM_INTERVAL`` seconds. Thread-safe, as both parts are."""

    def __init__(self, pool_bytes: int = POOL_BYTES) -> None:
        self.pool = SegmentPool(pool_bytes)
        self.mapper = SegmentMapper()
        self._next_trim = 0.0

    def maybe_trim(self, now: float | None = None) -> None:
        """Give back idle segments and drop stale mappings, unless that was done less than
        ``TRIM_INTERVAL`` seconds ago: call it from a loop, every pass."""
        now = time.monotonic() if now is None else now
        if now >= self._next_trim:
            self._next_trim = now + TRIM_INTERVAL
            self.pool.trim(now)
            self.mapper.trim(now)

    def close(self) -> None:
        """Unlink every segment of the pool and forget every mapping; receivers keep what
        they mapped, and arrays built on our mappings stay valid until dropped."""
        self.pool.close()
        self.mapper.close()
