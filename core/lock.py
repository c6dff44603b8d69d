"""One flock per job, so that a scheduled run never overlaps the previous one.

The lock is tied to an open file descriptor: the kernel releases it when the process dies,
even on kill -9, so there is never a stale lock to clean up by hand. The file keeps the holder's
pid, start time and command for the "already running" message.
"""

import fcntl
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

from . import output, secrets
from .errors import LockBusy

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def default_run_dir():
    if os.geteuid() == 0:
        return Path("/run/dbdeck")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime, "dbdeck") if runtime else Path(f"/tmp/dbdeck-{os.geteuid()}")


def _shared_parent(directory):
    """Whether others may create entries next to directory (e.g. /tmp): then the directory itself could
    have been planted by someone else and must be ours and private."""
    try:
        return bool(os.stat(directory.parent).st_mode & 0o002)
    except OSError:
        return False


def ensure_run_dir(directory):
    """Create the lock directory, or check the existing one, so that nobody else can hold our locks or
    turn a lock write into a write to another file: never a symlink; in a world-writable parent (the
    /tmp/dbdeck-<uid> fallback) it must be ours with mode 0700; anywhere, not writable by everyone."""
    from .errors import DbdeckError

    directory = Path(directory)
    private = _shared_parent(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700 if private else 0o755)
        info = os.lstat(directory)
    except OSError as exc:
        raise DbdeckError(f"cannot create the lock directory {directory}: {exc.strerror}") from None
    import stat

    problem = None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        problem = "is not a plain directory (a symlink?)"
    elif private and (info.st_uid != os.geteuid() or info.st_mode & 0o077):
        problem = (f"is owned by uid {info.st_uid} with mode {oct(info.st_mode & 0o777)}, in a directory "
                   f"anyone can write to; it must be yours and 0700")
    elif info.st_mode & 0o002 and not info.st_mode & stat.S_ISVTX:
        problem = "is writable by everyone"
    if problem:
        raise DbdeckError(f"refusing to use the lock directory {directory}: it {problem} (someone else could hold "
                          f"dbdeck's locks or redirect its writes); remove it or set dbdeck.run_dir")
    return directory


class JobLock:
    def __init__(self, name, run_dir=None):
        self.name = name
        self.run_dir = Path(run_dir) if run_dir else default_run_dir()
        self.path = self.run_dir / f"{_SAFE_NAME.sub('_', name)}.lock"
        self._fd = None

    def acquire(self, wait=0.0, waiting=None):
        """Take the lock; LockBusy when another process holds it. With wait > 0, keep trying for that many
        seconds first; waiting(holder) is called once when the wait starts (to say who we wait for)."""
        ensure_run_dir(self.run_dir)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            from .errors import DbdeckError

            raise DbdeckError(f"cannot open the lock file {self.path}: {exc.strerror}"
                              + (" (a symlink: refused)" if os.path.islink(self.path) else "")) from None
        deadline = time.monotonic() + wait
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _read_holder(fd)
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise LockBusy(f"{self.name} is already running{_describe(holder)}; not starting a second run "
                                   f"(lock {self.path})") from None
                if waiting and not announced:
                    waiting(holder)
                    announced = True
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "started": output.timestamp(),
            "command": secrets.mask(" ".join(sys.argv)),
        }).encode(), 0)
        self._fd = fd
        return self

    def release(self):
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    def holder(self):
        """Who holds the lock now (a dict), or None when nobody does."""
        if not self.path.exists():
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _read_holder(fd) or {}
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def state(self):
        """(state, holder): ("running", who holds it), ("dead", who held it and died without releasing it:
        kill -9, OOM, a crash), ("stopped", None) after a clean release, ("never", None) with no lock file."""
        if not self.path.exists():
            return "never", None
        holder = self.holder()
        if holder is not None:
            return "running", holder
        try:
            left = json.loads(self.path.read_bytes() or b"null")
        except (OSError, ValueError):
            left = None
        return ("dead", left) if left else ("stopped", None)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_holder(fd):
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


def _describe(holder):
    if not holder:
        return ""
    return f" (pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')})"
