"""Logging: stderr for people and journald, plus the seeds' per-day files where configured.

Every handler formats through MaskingFormatter, so a password that slips into a message, an
argument or an exception's text is replaced by *** before it reaches any output.
"""

import logging
import os
import sys
import time
from typing import TextIO
from pathlib import Path

from . import secrets

_STDERR_FORMAT = "%(levelname)s %(message)s"
_FILE_FORMAT = "[%(asctime)s] %(levelname)s %(name)s: %(message)s"


class MaskingFormatter(logging.Formatter):
    def format(self, record):
        return secrets.mask(super().format(record))

    def formatTime(self, record, datefmt=None):  # noqa: N802 - logging's name
        from .output import timestamp

        return timestamp(record.created)


class _OneLineWriteErrors:
    """A log file that cannot be written (full or read-only disk) is said once, in one line, on stderr;
    the job goes on (logging must never take it down) instead of printing a traceback per message."""

    _said_write_error = False

    def handleError(self, record):  # noqa: N802 - logging's name
        if self._said_write_error:
            return
        self._said_write_error = True
        error = sys.exc_info()[1]
        reason = getattr(error, "strerror", None) or error
        where = getattr(self, "path", None) or getattr(self, "directory", "a log file")
        try:
            sys.stderr.write(f"dbdeck: cannot write to {where}: {reason}; going on without that log\n")
        except (OSError, ValueError):
            pass


class DailyFileHandler(_OneLineWriteErrors, logging.Handler):
    """Appends to <directory>/<prefix>-YYYYMMDD.log, switching file when the date changes.

    Unlike TimedRotatingFileHandler it never renames files, matching the seeds' layout
    (tail -f /var/log/crm-sync/sync-$(date +%Y%m%d).log keeps working).
    """

    def __init__(self, directory, prefix, mode=0o640):
        super().__init__()
        self.directory = Path(directory)
        self.prefix = prefix
        self.mode = mode
        self._day = None
        self._stream: TextIO | None = None

    def path_for(self, day):
        return self.directory / f"{self.prefix}-{day}.log"

    def emit(self, record):
        try:
            day = time.strftime("%Y%m%d", time.localtime(record.created))
            if day != self._day or self._stream is None:
                self._open(day)
            stream = self._stream
            assert stream is not None
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # logging must never take the job down
            self.handleError(record)

    def _open(self, day):
        if self._stream:
            self._stream.close()
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path_for(day), os.O_WRONLY | os.O_APPEND | os.O_CREAT, self.mode)
        self._stream = os.fdopen(fd, "a", encoding="utf-8")
        self._day = day

    def close(self):
        if self._stream:
            try:
                self._stream.close()
            except OSError:  # the last buffered lines hit a full disk; already said by handleError
                pass
            self._stream = None
        super().close()


def setup(verbosity=0):
    """Configure the root dbdeck logger for stderr; call once per process."""
    logger = logging.getLogger("dbdeck")
    for handler in list(logger.handlers):
        if getattr(handler, "_dbdeck_stderr", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, "_dbdeck_stderr", True)  # ours, to be replaced by the next setup()
    handler.setFormatter(MaskingFormatter(_STDERR_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO if verbosity >= 1 else logging.WARNING)
    handler.setLevel(logger.level)
    logger.propagate = False
    return logger


def add_daily_file(directory, prefix, level=logging.INFO):
    """Also log to <directory>/<prefix>-YYYYMMDD.log (e.g. /var/log/crm-sync/sync-20261123.log)."""
    return _attach_file_handler(DailyFileHandler(directory, prefix), level)


def _attach_file_handler(handler, level):
    logger = logging.getLogger("dbdeck")
    handler.setFormatter(MaskingFormatter(_FILE_FORMAT))
    handler.setLevel(level)
    logger.addHandler(handler)
    if logger.level > level or logger.level == logging.NOTSET:
        logger.setLevel(level)
    return handler


class RunFileHandler(_OneLineWriteErrors, logging.StreamHandler):
    """One log file per run, <prefix>-YYYYMMDD-HHMMSS.log (the seeds' failover-*.log, rebuild-replica-*.log)."""

    def __init__(self, directory, prefix, mode=0o640):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = directory / f"{prefix}-{stamp}.log"
        suffix = 1
        while path.exists():  # two runs in one second: never append to the other run's file
            path = directory / f"{prefix}-{stamp}-{suffix}.log"
            suffix += 1
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        super().__init__(os.fdopen(fd, "a", encoding="utf-8"))
        self.path = path

    def close(self):
        try:
            self.stream.close()
        except OSError:  # the last buffered lines hit a full disk; already said by handleError
            pass
        finally:
            super().close()


def add_run_file(directory, prefix, level=logging.INFO):
    """Also log this run to its own file under directory; returns the handler (its .path is the file)."""
    return _attach_file_handler(RunFileHandler(directory, prefix), level)
