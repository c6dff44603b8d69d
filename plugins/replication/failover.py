"""auto-failover: watch the primary; after N failed checks, with the standby's agreement, fence and promote.

A check is a new connection plus a real query, both bounded by a timeout. Failover needs all of:
  * N consecutive failed checks of the primary;
  * the standby reachable, in recovery, and its WAL receiver *not* streaming (when it still streams,
    the primary is alive and only this monitor lost sight of it: no failover);
  * the standby's received WAL within max_lag_bytes of the last position the primary reported;
  * the old primary fenced (stopped, its container's restart policy off, standby.signal written), so it
    can only come back read-only. When fencing fails there is no promotion.
"""

import logging
import time

from dbdeck.errors import DbdeckError, LockBusy
from dbdeck.events import Event

from .cluster import lsn_to_int, probe_node
from .standby import fence, rejoin

log = logging.getLogger("dbdeck.replication")


class Monitor:
    def __init__(self, pair, interval=1.0, failures=3, timeout=2.0, max_lag_bytes=16 * 1024**2, rejoin=True,
                 lock=None):
        self.pair = pair
        self.lock = lock  # the replication commands' lock: a switchover or rebuild in progress pauses us
        self.interval, self.failures_needed, self.timeout = interval, failures, timeout
        self.max_lag_bytes, self.rejoin = max_lag_bytes, rejoin
        self.primary = None
        self.failed = 0
        self.last_lsn = None
        self.state = None
        self.failovers = 0

    def _state(self, state, message, level=logging.INFO, severity=None):
        """One log line per state change (not per check), and an event for the notify hook."""
        if state != self.state:
            self.pair.say(message, level)
            self.state = state
            if severity:
                self.pair.app.notify(Event(f"failover.{state}", message, severity=severity))

    def find_primary(self):
        self.primary = None
        snapshot = self.pair.probe(self.timeout)
        if len(snapshot.primaries) == 1:
            self.primary = self.pair.node(snapshot.primary.name)
            self.last_lsn = snapshot.primary.current_lsn
            return True
        self._state("no-primary", "waiting: " + ", ".join(f"{n.name} {n.role}" for n in snapshot.nodes),
                    logging.WARNING, "critical" if len(snapshot.primaries) > 1 else None)
        return False

    def check_primary(self):
        try:
            with self.primary.connect(timeout=self.timeout) as conn:
                conn.execute(f"SET statement_timeout = {int(self.timeout * 1000)}")
                row = conn.execute("SELECT pg_is_in_recovery(), pg_current_wal_lsn()::text").fetchone()
            if row[0]:
                return None, "it is in recovery now (a standby)"
            self.last_lsn = row[1]
            return True, None
        except Exception as exc:  # any failure counts; the text is for the log
            return False, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__

    def tick(self):
        """One monitoring step; returns the name of the new primary when it failed over."""
        if self.lock is None:
            return self._tick()
        try:
            self.lock.acquire()
        except LockBusy:
            self.failed, self.primary = 0, None  # roles may change meanwhile: find the primary again after
            self._state("paused", "paused: another replication command (switchover, rebuild...) is running")
            return None
        try:
            return self._tick()
        finally:
            self.lock.release()

    def _tick(self):
        if self.primary is None and not self.find_primary():
            return None
        ok, error = self.check_primary()
        if ok is None:  # demoted by someone else (a switchover): find the primary again next time
            self.pair.say(f"{self.primary.name}: {error}; looking for the primary")
            self.primary, self.failed = None, 0
            return None
        if ok:
            if self.failed:
                self.pair.say(f"primary {self.primary.name} answers again after {self.failed} failed check(s)")
            self.failed = 0
            self._state("healthy", f"monitoring primary {self.primary.name}")
            return None
        self.failed += 1
        self.pair.say(f"primary {self.primary.name} check failed ({self.failed}/{self.failures_needed}): "
                      f"{error}", logging.WARNING)
        if self.failed < self.failures_needed:
            return None
        return self.try_failover()

    def _standby_verdict(self):
        """(standby node, None) when the standby may take over, else (None, reason)."""
        others = [n for n in self.pair.nodes if n.name != self.primary.name]
        candidates = []
        for node in others:
            state = probe_node(node, self.timeout)
            if not state.reachable:
                continue
            if not state.in_recovery:
                return None, f"{node.name} already accepts writes"
            receiver = state.wal_receiver or {}
            if receiver.get("status") == "streaming":
                return None, (f"{node.name} still receives WAL from {self.primary.name}: the primary is alive, "
                              f"only this monitor cannot reach it")
            candidates.append((node, state))
        if not candidates:
            return None, "no standby is reachable"
        node, state = candidates[0]
        received = lsn_to_int(state.receive_lsn or state.replay_lsn)
        known = lsn_to_int(self.last_lsn)
        if known is not None and received is not None and known - received > self.max_lag_bytes:
            return None, (f"{node.name} received WAL up to {state.receive_lsn}, {known - received} bytes behind "
                          f"the primary's last known {self.last_lsn} (limit {self.max_lag_bytes})")
        return node, None

    def try_failover(self):
        old = self.primary
        standby, reason = self._standby_verdict()
        if standby is None:
            self._state("held", f"not failing over: {reason}", logging.WARNING, "warning")
            return None
        if self.pair.runner.dry_run:
            self._state("would-fail-over", f"primary {old.name} failed {self.failed} checks; {standby.name} agrees "
                                           f"it is gone: would fence {old.name} and promote {standby.name}")
            return None
        self._state("failing-over", f"primary {old.name} failed {self.failed} checks; {standby.name} agrees it is "
                                    f"gone: fencing {old.name}, promoting {standby.name}", logging.WARNING)
        try:
            fence(self.pair, old, standby)
        except DbdeckError as exc:
            self._state("fence-failed", f"NOT promoting {standby.name}: could not fence {old.name} ({exc}); "
                                        f"two primaries would be possible", logging.ERROR, "critical")
            return None
        with standby.connect() as conn, standby.endpoint.driver_errors("pg_promote"):
            conn.execute("SELECT pg_promote(true, %s)", (self.pair.settings.wait_timeout,))
        self.pair.wait_for(lambda: self.pair.accepts_writes(standby), f"{standby.name} to accept writes")
        self.failovers += 1
        self.primary, self.failed = standby, 0
        self._state("promoted", f"FAILOVER: {standby.name} is the primary (was {old.name})", logging.WARNING,
                    "critical")
        self._synchronous(standby, "")
        if self.rejoin:
            try:
                how = rejoin(self.pair, old, standby)
                self._state("rejoined", f"{old.name} rejoined as a standby of {standby.name} ({how})",
                            severity="info")
                self._synchronous(standby, self.pair.settings.synchronous_standby_names)
            except DbdeckError as exc:
                self._state("rejoin-failed", f"{old.name} stays fenced; rejoin failed: {exc}", logging.ERROR,
                            "warning")
        return standby.name

    def _synchronous(self, primary, wanted):
        """Alone, a primary that waits for a synchronous standby would block every commit: it runs
        asynchronously until a standby has rejoined, then the configured setting applies again."""
        if wanted is None:
            return
        try:
            with primary.connect(timeout=self.timeout) as conn:
                current = conn.execute("SHOW synchronous_standby_names").fetchone()[0]
                if current == wanted:
                    return
                from psycopg import sql

                conn.execute(sql.SQL("ALTER SYSTEM SET synchronous_standby_names = {}").format(sql.Literal(wanted)))
                conn.execute("SELECT pg_reload_conf()")
            self.pair.say(f"{primary.name}: synchronous_standby_names = '{wanted}'"
                          + (" (no standby yet: commits do not wait until one rejoins)" if not wanted else ""))
        except Exception as exc:
            self.pair.say(f"{primary.name}: could not set synchronous_standby_names: {exc}", logging.ERROR)

    def run(self, stop):
        """Loop until stop (a threading.Event) is set."""
        while not stop.is_set():
            started = time.monotonic()
            try:
                self.tick()
            except DbdeckError as exc:
                self.pair.say(f"monitor step failed: {exc}", logging.ERROR)
            stop.wait(max(0.0, self.interval - (time.monotonic() - started)))
