"""An advisory lock on a run directory for writing (issue #19), re-exported by :mod:`certkd.runs`.

``with lock_run_dir(out, "certkd train"):`` holds ``OUT/.certkd.lock`` with ``fcntl.flock`` for as long
as the block runs. The file holds one JSON object naming the holder (pid, host, command, command line,
start time). A second writer does not wait: it gets a one-line :class:`CertkdError` naming the holder
(exit code 2 at the CLI). The kernel releases a ``flock`` when its process dies, so a lock file left by
a killed process (SIGKILL, power loss) never blocks the next run: the file is reused.

Rules:

* The lock file is not part of a run: :func:`run_entries` leaves it out, so a folder holding only a
  lock file is empty to ``train``, and :func:`certkd.runs.is_run_dir` never looks at it.
* A folder the lock had to create is removed on release if nothing else was written into it, so a
  refused or failed command leaves no stub folder behind (``RunLock.created``).
* The holder removes its lock file on release, before closing it; a process that opened the old file
  meanwhile sees that the path now names another file (or none) and tries again on the new one.
* Locking is per open file, so the same process locking a folder twice (``sweep`` locks a run and
  then trains it) shares one lock: the inner call is a no-op.
* Where locking is not possible, writing goes on unlocked and concurrent writers are not detected:
  on platforms without ``fcntl`` (Windows), on file systems that refuse ``flock``, and for a path
  that is not (and cannot become) a folder this process may write, whose error the caller's own
  checks report. On NFS, Linux emulates ``flock`` with byte-range locks, which work across hosts.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

from certkd.errors import CertkdError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; see the module notes
    fcntl = None  # type: ignore[assignment]

PathLike = Union[str, os.PathLike]
LOCK_FILE = ".certkd.lock"
_HOLDER_READ_TRIES = 20  # × 25 ms: how long a refused writer waits for the holder to finish writing its name
_HELD: Dict[str, "RunLock"] = {}  # real path of a locked folder → this process's lock on it


class RunLock:
    """A held (or, where locking is impossible, merely attempted) lock on a run directory.

    Attributes:
        path: the folder.
        what: the command holding it, e.g. "certkd train".
        held: whether this process holds the flock (False where locking is not possible).
        created: the topmost folder created for the lock (``path`` or an ancestor), or None. On release it is
            removed, from ``path`` upwards, as far as the folders are empty; callers that empty a folder
            they replaced may set it (``train --force`` after a failed first epoch).
    """

    def __init__(self, path: PathLike, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self.held = False
        self.created: Optional[Path] = None
        self._fd: Optional[int] = None
        self._key: Optional[str] = None
        self._depth = 0

    @property
    def file(self) -> Path:
        """``path/.certkd.lock``."""
        return self.path / LOCK_FILE

    def _make_dir(self) -> bool:
        """Create ``path`` (recording the topmost new folder); False if it cannot be a folder we write."""
        p = self.path
        if p.is_dir():
            return True
        if p.exists() or p.is_symlink():
            return False
        top = p
        while not top.parent.exists() and top.parent != top.parent.parent:
            top = top.parent
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError:
            return False
        if self.created is None:
            self.created = top
        return True

    def acquire(self, option: str = "--out") -> None:
        """Take the lock, or raise a one-line CertkdError naming its holder (``option``: what to change)."""
        for _ in range(100):  # each retry follows a release by another process: it ends quickly
            if not self._make_dir() or fcntl is None:
                return
            try:
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except FileNotFoundError:  # the folder was removed by a finishing holder: make it again
                continue
            except OSError:  # not writable: the caller's own checks say so
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                busy = e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
                holder = _read_holder(fd) if busy else None
                os.close(fd)
                if busy:
                    raise CertkdError(holder_message(self.path, holder, option)) from None
                return  # a file system without flock: go on unlocked
            if not _same_file(fd, self.file):  # the previous holder unlinked it after we opened it
                os.close(fd)
                continue
            self._fd, self.held = fd, True
            _write_holder(fd, self.what)
            return

    def release(self) -> None:
        """Remove the lock file (if still ours), close it, and remove the folders it created while empty."""
        fd, self._fd, self.held = self._fd, None, False
        if fd is not None:
            try:
                if _same_file(fd, self.file):
                    os.unlink(self.file)
            except OSError:
                pass
            os.close(fd)  # closing releases the flock
        top = self.created
        if top is None or top not in (self.path, *self.path.parents):
            return
        d = self.path
        while True:
            try:
                d.rmdir()
            except OSError:  # not empty (another writer, or results), or already gone
                if d.exists():
                    return
            if d == top:
                return
            d = d.parent


@contextmanager
def lock_run_dir(path: PathLike, what: str, option: str = "--out") -> Iterator[RunLock]:
    """Hold the write lock on the folder ``path`` (created if missing) for the duration of the block.

    Args:
        path: the run directory (or verify's ``--out``).
        what: the holder's command as a second writer is told, e.g. "certkd train".
        option: the option the second writer can change to write elsewhere ("--out", "out_dir").
    Raises:
        CertkdError: another process holds the lock: "OUT is being written by pid 1234 (certkd train,
            started 12:03:01); wait for it to finish or choose another --out".
    """
    lock = RunLock(path, what)
    try:
        key: Optional[str] = os.path.realpath(path)
    except (OSError, ValueError):
        key = None
    outer = _HELD.get(key) if key is not None else None
    if outer is not None:  # this process holds it already: one lock, released by the outer block
        outer._depth += 1
        try:
            yield outer
        finally:
            outer._depth -= 1
        return
    try:
        lock.acquire(option)
    except BaseException:
        lock.release()
        raise
    if lock.held and key is not None:
        lock._key = key
        _HELD[key] = lock
    try:
        yield lock
    finally:
        if lock._key is not None:
            _HELD.pop(lock._key, None)
        lock.release()


def holder_message(path: PathLike, holder: Optional[Dict[str, Any]], option: str = "--out") -> str:
    """The one line a second writer gets, from the holder record of the lock file (None: unreadable)."""
    if not holder:
        who = "another process"
    else:
        who = f"pid {holder.get('pid', '?')}"
        host = holder.get("host")
        if host and host != socket.gethostname():
            who += f" on {host}"
        started = holder.get("started")
        when = ""
        if isinstance(started, (int, float)):
            fmt = "%H:%M:%S" if time.localtime(started)[:3] == time.localtime()[:3] else "%Y-%m-%d %H:%M:%S"
            when = f", started {time.strftime(fmt, time.localtime(started))}"
        who += f" ({holder.get('command', 'certkd')}{when})"
    return f"{path} is being written by {who}; wait for it to finish or choose another {option}"


def run_entries(path: PathLike) -> List[Path]:
    """What a folder holds, the lock file left out (empty for a missing folder)."""
    p = Path(path)
    if not p.is_dir():
        return []
    return [c for c in p.iterdir() if c.name != LOCK_FILE]


def clear_run_dir(path: PathLike) -> None:
    """Delete everything in the folder ``path`` except its lock file (which its holder removes)."""
    import shutil

    for c in run_entries(path):
        if c.is_dir() and not c.is_symlink():
            shutil.rmtree(c)
        else:
            c.unlink()


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)


def _write_holder(fd: int, what: str) -> None:
    """Replace the lock file's content with this process's record, in one write of a few hundred bytes."""
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": what,
              "argv": " ".join(sys.argv)[:1000], "started": time.time()}
    data = (json.dumps(record) + "\n").encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except OSError:  # the record is informative only: the flock is what excludes
        pass


def _read_holder(fd: int) -> Optional[Dict[str, Any]]:
    """The holder record of a locked file; None if it stays unreadable (the holder has just locked it)."""
    for _ in range(_HOLDER_READ_TRIES):
        try:
            data = os.pread(fd, 1 << 14, 0)
            rec = json.loads(data.decode("utf-8"))
            if isinstance(rec, dict):
                return rec
        except (OSError, ValueError):
            pass
        time.sleep(0.025)
    return None
