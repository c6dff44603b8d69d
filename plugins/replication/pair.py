"""The configured nodes, with the pieces every replication command shares: probing, choosing the
primary/standby, waiting, the per-run log file and step messages."""

import contextlib
import logging
import time

import click

from dbdeck.errors import ConfigError, DbdeckError, LockBusy, UsageError

from .cluster import probe
from .nodes import Node, make_driver

log = logging.getLogger("dbdeck.replication")


class Pair:
    def __init__(self, app):
        self.app = app
        self.settings = app.config.section("replication")
        if len(self.settings.nodes) < 2:
            raise ConfigError(f"{app.config.where()}: replication.nodes: declare the primary and the standby "
                              f"(found {len(self.settings.nodes)}); see etc/dbdeck.yaml")
        self.nodes = []
        for name, config in self.settings.nodes.items():
            endpoint = app.endpoint(config.endpoint, key=f"replication.nodes.{name}.endpoint")
            endpoint.name = name
            self.nodes.append(Node(name, config, endpoint, make_driver(name, config, app.runner)))
        self.runner = app.runner

    def node(self, name):
        for node in self.nodes:
            if node.name == name:
                return node
        raise UsageError(f"no node named {name!r} (nodes: {', '.join(n.name for n in self.nodes)})")

    def probe(self, timeout=5):
        from .roles import recorded_primary

        snapshot = probe(self.nodes, timeout)
        snapshot.recorded_primary = recorded_primary(self)
        return snapshot

    @property
    def patroni(self):
        return self.settings.manager == "patroni"

    def thresholds(self, **given):
        """check-replication's limits: the command line's where given, else the configuration's."""
        from . import synchronous
        from .cluster import Thresholds

        s = self.settings
        configured = {"warn_lag_bytes": s.warn_lag_bytes, "crit_lag_bytes": s.crit_lag_bytes,
                      "warn_lag_seconds": s.warn_lag_seconds, "crit_lag_seconds": s.crit_lag_seconds}
        values = {key: given[key] if given.get(key) is not None else value for key, value in configured.items()}
        # under Patroni, synchronous_mode names the standby itself: its problems() checks that instead
        return Thresholds(**values, synchronous_standby_names=None if self.patroni else synchronous.wanted(self))

    def assess(self, thresholds, timeout=5):
        """(snapshot, status, problems, Patroni's /cluster or None): the same verdicts from SQL for both
        managers, plus what Patroni itself reports as wrong."""
        from .cluster import CRITICAL, evaluate

        snapshot = self.probe(timeout)
        status, problems = evaluate(snapshot, thresholds)
        if not self.patroni:  # Patroni keeps its own pgpass in step with the role
            from .rotate import secret_problems

            found = secret_problems(self, snapshot)
            status = max([status, *(level for level, _ in found)])
            return snapshot, status, problems + [text for _, text in found], None
        from .patroni import PatroniAPI, problems as patroni_problems

        try:
            cluster = PatroniAPI(self).cluster(timeout=timeout)
            found = patroni_problems(cluster, self)
        except DbdeckError as exc:
            cluster, found = None, [(CRITICAL, str(exc))]
        ranked = sorted(found, key=lambda p: -p[0])
        status = max([status, *(level for level, _ in found)])
        worst = [text for level, text in ranked if level >= status]
        return snapshot, status, worst + problems + [text for level, text in ranked if level < status], cluster

    @contextlib.contextmanager
    def operator_lock(self):
        """The replication lock for an operator's command. A dry run changes nothing and takes none.
        Held by the auto-failover monitor (only while it fences, promotes or rejoins), it is waited
        for; held by another operator's command, the answer is 'already running' (exit 75) at once."""
        if self.runner.dry_run:
            yield None
            return
        lock = self.app.lock("replication")
        try:
            lock.acquire()
        except LockBusy:
            holder = lock.holder() or {}
            if "auto-failover" not in str(holder.get("command", "")):
                raise
            wait = max(600, self.settings.wait_timeout)
            lock.acquire(wait=wait, waiting=lambda who: self.say(
                f"auto-failover (pid {who.get('pid')}) is acting on the pair since {who.get('started')}: waiting "
                f"up to {wait}s for it to finish", logging.WARNING))
        try:
            yield lock
        finally:
            lock.release()

    # --- messages ------------------------------------------------------------------------------------
    def say(self, message, level=logging.INFO):
        """A step: printed for the operator and written to the run's log file."""
        log.log(level, message)
        if level < logging.WARNING:  # warnings and errors already reach stderr through logging
            click.echo(("[dry-run] " if self.runner.dry_run else "") + message, err=self.app.format == "json")

    @contextlib.contextmanager
    def run_log(self, prefix):
        """The seed's per-run log (failover-YYYYMMDD-HHMMSS.log...) under replication.log_dir; the run's
        outcome, a refusal or an error included, ends up in it."""
        directory = self.settings.log_dir or self.app.config.core.log_dir
        if directory is None or self.runner.dry_run:
            yield None
            return
        from dbdeck.log import add_run_file

        handler = add_run_file(directory, prefix)
        self.say(f"log: {handler.path}")
        try:
            yield handler
        except DbdeckError as exc:
            handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, f"failed: {exc}", (), None))
            raise
        else:
            handler.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, "done", (), None))

    # --- waiting ---------------------------------------------------------------------------------
    def record(self, name):
        """<state_dir>/replication/<name>.json: what dbdeck keeps about the pair between runs (the primary it
        made, the synchronous setting a switchover parked, an unfinished rotation)."""
        from dbdeck.state import StateFile

        return StateFile(self.app.config.state_dir / "replication" / f"{name}.json")

    def wait_for(self, check, what, timeout=None):
        timeout = timeout or self.settings.wait_timeout
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                raise DbdeckError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.3)

    def accepts_writes(self, node):
        """A real write test: assigning a transaction id fails on a standby."""
        try:
            with node.connect(timeout=3) as conn, node.endpoint.driver_errors("write test"):
                conn.execute("SELECT pg_current_xact_id()")
            return True
        except DbdeckError:
            return False

    def is_streaming(self, standby, primary):
        """The standby's WAL receiver streams and the primary lists it as streaming."""
        snapshot = self.probe(timeout=3)
        entry = next((s for s in snapshot.standbys if s.name == standby.name), None)
        node = snapshot.node(standby.name)
        return bool(entry and entry.state == "streaming" and entry.receiver_status == "streaming"
                    and snapshot.primary and snapshot.primary.name == primary.name and node.in_recovery)
