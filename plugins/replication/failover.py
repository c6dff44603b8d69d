"""auto-failover: watch the primary; after N failed checks, with the standby's agreement, fence and promote.

A check is a new connection plus a real query, both bounded by a timeout. Failover needs all of:
  * N consecutive failed checks of the primary, or one when the evidence is strong: the connection was
    refused (nothing listens: the postmaster is gone); a timeout is weak evidence (a frozen or overloaded
    server) and needs all N;
  * the standby reachable, in recovery, and its WAL receiver *not* streaming (when it still streams,
    the primary is alive and only this monitor lost sight of it: no failover);
  * the standby's received WAL within max_lag_bytes of the last position the primary reported;
  * the old primary fenced (its container's restart policy off, standby.signal written, then stopped), so
    it can only come back read-only. When fencing fails there is no promotion.
The monitor takes the replication lock only to act (fence, promote, rejoin), never to check: operators'
commands (switchover, promote-replica, rebuild-replica) take it and the monitor pauses while they run,
then looks for the primary again.
"""

import logging
import time

from dbdeck.errors import DbdeckError, LockBusy
from dbdeck.events import Event

from . import synchronous
from .cluster import lsn_to_int, probe_node
from .standby import ensure_slot, fence, rejoin

# libpq's words when nothing listens on the port or the unix socket: the postmaster is gone
_REFUSED = ("connection refused", "no such file or directory")

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
        presumed = self._presumed_primary(snapshot) if not snapshot.primaries else None
        if presumed is not None:
            # e.g. it died while we were paused for a switchover that had just made it the primary
            self.primary, self.last_lsn = presumed, None
            self._state("presumed", f"no node accepts writes; {presumed.name} is down and the standby follows it: "
                                    f"treating {presumed.name} as the failed primary", logging.WARNING)
            return True
        self._state("no-primary", "waiting: " + ", ".join(f"{n.name} {n.role}" for n in snapshot.nodes),
                    logging.WARNING, "critical" if len(snapshot.primaries) > 1 else None)
        return False

    def _presumed_primary(self, snapshot):
        """The down node that every reachable standby is configured to stream from, if there is one."""
        from psycopg.conninfo import conninfo_to_dict

        upstreams = set()
        for state in snapshot.nodes:
            if not (state.reachable and state.in_recovery):
                continue
            node = self.pair.node(state.name)
            try:
                with node.connect(timeout=self.timeout) as conn:
                    conninfo = conn.execute("SHOW primary_conninfo").fetchone()[0]
                options = conninfo_to_dict(conninfo) if conninfo else {}
            except Exception:
                return None
            upstreams.add((options.get("host"), str(options.get("port") or 5432)))
        down = [self.pair.node(n.name) for n in snapshot.nodes if not n.reachable and not n.responded]
        followed = [n for n in down if (n.replication_address[0], str(n.replication_address[1])) in upstreams]
        return followed[0] if len(upstreams) == 1 and len(followed) == 1 else None

    def check_primary(self):
        try:
            with self.primary.connect(timeout=self.timeout) as conn:
                conn.execute(f"SET statement_timeout = {int(self.timeout * 1000)}")
                row = conn.execute("SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN NULL "
                                   "ELSE pg_current_wal_lsn()::text END").fetchone()
            if row[0]:
                return None, "it is in recovery now (a standby)"
            self.last_lsn = row[1]
            return True, None
        except Exception as exc:  # any failure counts; the text is for the log
            return False, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__

    def _operator_busy(self):
        """An operator's replication command holds the lock: pause, and find the primary again after."""
        if self.lock is None or self.lock.holder() is None:
            return False
        self.failed, self.primary = 0, None
        self._state("paused", "paused: another replication command (switchover, rebuild...) is running")
        return True

    def tick(self):
        """One monitoring step; returns the name of the new primary when it failed over."""
        if self._operator_busy():
            return None
        return self._tick()

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
        strong = any(word in error.lower() for word in _REFUSED)
        self.pair.say(f"primary {self.primary.name} check failed ({self.failed}/{self.failures_needed}"
                      f"{', refused: nothing listens' if strong else ''}): {error}", logging.WARNING)
        if self.failed < self.failures_needed and not strong:
            return None
        return self.try_failover(strong)

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

    def try_failover(self, strong=False):
        old = self.primary
        standby, reason = self._standby_verdict()
        # nothing listens on the primary: its standby's WAL receiver notices within milliseconds, so ask
        # again at once rather than a whole interval later
        deadline = time.monotonic() + self.timeout
        while strong and standby is None and "still receives WAL" in reason and time.monotonic() < deadline:
            time.sleep(0.05)
            standby, reason = self._standby_verdict()
        if standby is None:
            self._state("held", f"not failing over: {reason}", logging.WARNING, "warning")
            return None
        if self.pair.runner.dry_run:
            self._state("would-fail-over", f"primary {old.name} failed {self.failed} checks; {standby.name} agrees "
                                           f"it is gone: would fence {old.name} and promote {standby.name}")
            return None
        if self.lock is None:
            return self._fail_over(old, standby)
        try:
            self.lock.acquire()
        except LockBusy:
            self._operator_busy()
            return None
        try:
            return self._fail_over(old, standby)
        finally:
            self.lock.release()

    def _fail_over(self, old, standby):
        self._state("failing-over", f"primary {old.name} failed {self.failed} checks; {standby.name} agrees it is "
                                    f"gone: fencing {old.name}, promoting {standby.name}", logging.WARNING)
        try:
            fence(self.pair, old, standby)
        except DbdeckError as exc:
            self._state("fence-failed", f"NOT promoting {standby.name}: could not fence {old.name} ({exc}); "
                                        f"two primaries would be possible", logging.ERROR, "critical")
            return None
        self._reserve_wal_for(old, standby)
        # alone once promoted: commits must not wait for a standby from the first one on
        synchronous.primary_alone(self.pair, standby)
        with standby.connect() as conn, standby.endpoint.driver_errors("pg_promote"):
            conn.execute("SELECT pg_promote(true, %s)", (self.pair.settings.wait_timeout,))
        self.pair.wait_for(lambda: self.pair.accepts_writes(standby), f"{standby.name} to accept writes")
        self.failovers += 1
        self.primary, self.failed = standby, 0
        self._state("promoted", f"FAILOVER: {standby.name} is the primary (was {old.name})", logging.WARNING,
                    "critical")
        from .backup import after_role_change

        after_role_change(self.pair, standby)
        if self.rejoin:
            try:
                how = rejoin(self.pair, old, standby)
                self._state("rejoined", f"{old.name} rejoined as a standby of {standby.name} ({how})",
                            severity="info")
            except DbdeckError as exc:
                self._state("rejoin-failed", f"{old.name} stays fenced; rejoin failed: {exc}", logging.ERROR,
                            "warning")
        return standby.name

    def _reserve_wal_for(self, old, primary):
        """The slot on the standby *before* it is promoted: reserved from its last restartpoint, it keeps
        the WAL the old primary's rejoin replays (from before the fork) through the promotion's checkpoint."""
        try:
            ensure_slot(self.pair, primary)
        except DbdeckError as exc:
            self.pair.say(f"{primary.name}: could not create slot {self.pair.settings.slot} for {old.name}'s "
                          f"rejoin: {exc}", logging.ERROR)

    def run(self, stop):
        """Loop until stop (a threading.Event) is set."""
        while not stop.is_set():
            started = time.monotonic()
            try:
                self.tick()
            except DbdeckError as exc:
                self.pair.say(f"monitor step failed: {exc}", logging.ERROR)
            stop.wait(max(0.0, self.interval - (time.monotonic() - started)))
