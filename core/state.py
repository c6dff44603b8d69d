"""Files that commands keep between runs, written so that a crash never leaves half a file."""

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path

from .errors import DbdeckError


def write_atomic(path, text, mode=0o644):
    """Replace path with text: readers see the old or the new content, never a mix, also after a
    power loss (the new content is synced before the rename). A full or read-only disk is a
    one-line DbdeckError and leaves the old file in place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise DbdeckError(f"could not save {path}: {exc.strerror or exc}") from None


class StateFile:
    """A JSON object on disk; update() is a read-modify-write under flock, safe between processes."""

    def __init__(self, path):
        self.path = Path(path)

    def read(self):
        """The object on disk; {} when it is missing, damaged or not an object (a run then decides as
        if it had no state, which is always the safe side: copy again, run again)."""
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def entry(self, key):
        """data[key] when it is an object, else {} (a hand-edited or damaged file)."""
        value = self.read().get(key)
        return value if isinstance(value, dict) else {}

    def write(self, data):
        write_atomic(self.path, json.dumps(data, indent=2, sort_keys=True, default=str))

    @contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def update(self, key, **fields):
        """Merge fields into data[key] and save."""
        with self._locked():
            data = self.read()
            if not isinstance(data.get(key), dict):
                data[key] = {}
            data[key].update(fields)
            self.write(data)
