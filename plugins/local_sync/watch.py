"""`local-sync watch`: tenants kept current in near real time from the main database's NOTIFYs.

The NOTIFY triggers `local-sync setup` installs wake the loop; a burst of changes is collected for
`debounce_ms` and synced by one incremental round. A round also runs every
`fallback_interval_seconds` without notifications, and after every (re)connection: that is the
catch-up after a restart or a lost connection, since notifications sent while nobody listened are
gone. Incremental rounds read by watermark, so nothing depends on a notification arriving.
"""

import logging
import signal
import threading
import time

from dbdeck.errors import DbdeckError

from .source import NOTIFY_CHANNEL

log = logging.getLogger("dbdeck.local_sync")

_SLICE_SECONDS = 0.5


class Watcher:
    def __init__(self, sync, only, report):
        self.sync = sync
        self.only = only
        self.report = report
        self.settings = sync.settings.watch
        self.stop = threading.Event()
        self.rounds = 0

    def install_signal_handlers(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop.set())

    def run(self):
        while not self.stop.is_set():
            try:
                # a dropped connection (restart, failover) surfaces as a driver error: one masked line
                with self.sync.source_endpoint.driver_errors("watch"):
                    self._listen()
            except DbdeckError as exc:
                self.report(f"watch: {exc}; reconnecting in {self.settings.reconnect_seconds}s")
            self.stop.wait(self.settings.reconnect_seconds)

    def _listen(self):
        endpoint = self.sync.source_endpoint
        with endpoint.connect(autocommit=True) as connection:
            connection.execute(f"LISTEN {NOTIFY_CHANNEL}")
            self.report(f"watch: listening on {endpoint.describe()} (channel {NOTIFY_CHANNEL})")
            self._round("catch-up")
            last_round = time.monotonic()
            while not self.stop.is_set():
                woken = any(True for _ in connection.notifies(timeout=_SLICE_SECONDS, stop_after=1))
                if woken:
                    # collect the rest of the burst: one round for many statements
                    deadline = time.monotonic() + self.settings.debounce_ms / 1000
                    while (left := deadline - time.monotonic()) > 0:
                        for _ in connection.notifies(timeout=left):
                            pass
                    self._round("notified")
                    last_round = time.monotonic()
                elif time.monotonic() - last_round >= self.settings.fallback_interval_seconds:
                    self._round("periodic")
                    last_round = time.monotonic()

    def _round(self, why):
        self.rounds += 1
        result = self.sync.run(self.only)
        for outcome in result["instances"]:
            if outcome["status"] != "ok":
                self.report(f"watch: {outcome['instance']}: {outcome['status']}: {outcome.get('error')}")
                continue
            changes = [f"{t['rows']} {name}" + (f" (-{t['removed']})" if t["removed"] else "")
                       for name, t in outcome["tables"].items() if t["rows"] or t["removed"]]
            if changes:
                self.report(f"watch: {outcome['instance']}: {', '.join(changes)} ({why})")
        log.debug("watch round %d (%s) took %.3fs", self.rounds, why, result["seconds"])
