"""Writing lines for people and programs without letting a closed reader stop the work.

`dbdeck ... | head -1` closes stdout after one line. A command that is halfway through a copy must
still finish or clean up (drop its staging database, release its lock), so the writes here never
raise: once a stream is gone, later lines to it are dropped and the work goes on. Logs still get
every line.
"""

import os
import sys
import time
from datetime import datetime

_closed: set[str] = set()


def timestamp(at: float | None = None) -> str:
    """The one time format dbdeck prints and stores: ISO 8601 with the local offset, to the second
    (2026-12-03T07:16:00+00:00)."""
    return datetime.fromtimestamp(time.time() if at is None else at).astimezone().isoformat(timespec="seconds")


class TimestampedLines:
    """A text stream whose every line starts with timestamp(): the output of a background daemon
    (auto-failover --daemon) goes to a file that has no other clock."""

    def __init__(self, stream):
        self._stream = stream
        self._line_start = True

    def write(self, text):
        if isinstance(text, (bytes, bytearray)):  # click probes and may write bytes
            text = bytes(text).decode(errors="replace")
        pieces = []
        for piece in text.splitlines(keepends=True):
            if self._line_start:
                pieces.append(timestamp() + " ")
            pieces.append(piece)
            self._line_start = piece.endswith("\n")
        return self._stream.write("".join(pieces))

    def __getattr__(self, name):
        return getattr(self._stream, name)


class JsonStdout:
    """sys.stdout while a command runs with --format json: stdout then carries exactly one JSON document.
    The document goes through document(); anything else a command writes to stdout (a plugin's progress
    line, a dry-run step) is a message: it goes to stderr and is kept, so that a command that produced no
    document of its own still ends with one listing them (cli.run_command)."""

    def __init__(self, stream):
        self._stream = stream
        self.written = 0
        self.messages: list[str] = []

    def write(self, text):
        self.messages.extend(piece for piece in text.splitlines() if piece.strip())
        return sys.stderr.write(text)

    @property
    def buffer(self):
        """Where a program dbdeck runs with its output passed through writes: a message, so stderr."""
        return sys.stderr.buffer

    def write_document(self, text):
        self.written += len(text)
        self._stream.write(text)
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def document(text):
    """Write the command's JSON document (one per run) to stdout."""
    if isinstance(sys.stdout, JsonStdout):
        try:
            sys.stdout.write_document(text + "\n")
        except (BrokenPipeError, ValueError, OSError):
            _closed.add("stdout")
        return
    line(text)


def step(text):
    """A message for people (a dry-run step, what is being done) while --format json keeps stdout for the
    document: stderr, and kept for the closing document."""
    if isinstance(sys.stdout, JsonStdout):
        sys.stdout.messages.append(text)
    line(text, err=True)


def line(text, err=False):
    """Write text and a newline to stdout (stderr with err=True); never raises."""
    stream = sys.stderr if err else sys.stdout
    name = "stderr" if err else "stdout"
    if name in _closed:
        return
    try:
        stream.write(text + "\n")
        stream.flush()
    except (BrokenPipeError, ValueError):
        _closed.add(name)
        detach(stream)
    except OSError:
        _closed.add(name)


def detach(stream=None):
    """Point a closed stream's descriptor at /dev/null so buffered bytes and the exit flush do not
    fail again (Python would print 'Exception ignored ... BrokenPipeError')."""
    stream = stream or sys.stdout
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def human_bytes(count: float | None) -> str:
    """The one text form of a size (JSON carries plain bytes): 512 B, 16.0 kB, 1.5 GB (1024-based, as
    PostgreSQL prints them)."""
    if count is None:
        return "?"
    value = float(count)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"  # pragma: no cover - the loop always returns


def human_duration(seconds: float | None) -> str:
    """45s, 12m, 3h 05m, 2d 04h: an age or a duration for people."""
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600:02d}h"


def render(renderable, width: int | None = None) -> str:
    """A rich renderable (a table) as plain text: colour only on a terminal and never with NO_COLOR."""
    from io import StringIO

    from rich.console import Console

    buffer = StringIO()
    colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    Console(file=buffer, width=width or 200, highlight=False, force_terminal=colour, no_color=not colour,
            soft_wrap=False).print(renderable)
    return "\n".join(text.rstrip() for text in buffer.getvalue().splitlines())


def table(rows, columns, title=None, width: int | None = None) -> str:
    """Rows for people as a table with headers: columns is [(header, key)], key a dict key of each row or a
    function of the row. Empty cells for missing values; colour rules as render()."""
    from rich.table import Table

    shown = Table(box=None, pad_edge=False, header_style="bold", title=title, title_justify="left",
                  title_style="bold")
    for header, _ in columns:
        shown.add_column(header, overflow="fold")
    for row in rows:
        cells = []
        for _, key in columns:
            value = key(row) if callable(key) else row.get(key)
            cells.append("" if value is None else str(value))
        shown.add_row(*cells)
    return render(shown, width)
