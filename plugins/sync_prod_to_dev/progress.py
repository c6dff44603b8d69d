"""Progress of a long copy: one rewritten status line on a terminal, a log line per tenth otherwise."""

import sys
import threading
import time


from dbdeck.output import human_bytes  # noqa: F401 - the one size format; re-exported for this plugin


class Progress:
    def __init__(self, say, total_items, total_bytes, what, stream=None):
        self.say = say
        self.total_items = total_items
        self.total_bytes = total_bytes
        self.what = what
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self.items = 0
        self.bytes = 0
        self.started = time.monotonic()
        self._reported_tenth = 0
        self._lock = threading.Lock()

    def line(self, final=False):
        percent = 100 * self.bytes / self.total_bytes if self.total_bytes else 100 * self.items / self.total_items
        elapsed = time.monotonic() - self.started
        rate = self.bytes / elapsed if elapsed > 0 else 0
        pace = f", {human_bytes(rate)}/s" if rate else ""
        left = ""
        if not final and rate and self.total_bytes > self.bytes:
            left = f", about {(self.total_bytes - self.bytes) / rate:.0f}s left"
        return (f"{self.items}/{self.total_items} {self.what}, {human_bytes(self.bytes)} of "
                f"{human_bytes(self.total_bytes)} ({percent:.0f}%, {elapsed:.0f}s{pace}{left})")

    def update(self, items, done_bytes):
        with self._lock:
            # never backwards: a table's COPY progress row disappears while its indexes are built
            self.items, self.bytes = max(self.items, items), max(self.bytes, min(done_bytes, self.total_bytes))
            if self.interactive:
                self.stream.write("\r\033[K" + self.line())
                self.stream.flush()
                return
            tenth = int(10 * self.items / self.total_items)
            if self.total_bytes:
                tenth = max(tenth, int(10 * self.bytes / self.total_bytes))
            if tenth > self._reported_tenth and self.items < self.total_items:
                self._reported_tenth = tenth
                self.say("progress: " + self.line())

    def finish(self):
        self.items, self.bytes = self.total_items, self.total_bytes
        if self.interactive:
            self.stream.write("\r\033[K")
            self.stream.flush()
        self.say("copied " + self.line(final=True))
