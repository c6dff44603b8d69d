"""Files that commands keep between runs, written so that a crash never leaves half a file."""

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path


def write_atomic(path, text, mode=0o644):
    """Replace path with text: readers see the old or the new content, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


class StateFile:
    """A JSON object on disk; update() is a read-modify-write under flock, safe between processes."""

    def __init__(self, path):
        self.path = Path(path)

    def read(self):
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {}

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
            data.setdefault(key, {}).update(fields)
            self.write(data)
