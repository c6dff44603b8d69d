"""check-replication, setup-master, promote-replica, rebuild-replica (seed 004's scripts)."""

import json
import sys

import click

from dbdeck.cli import pass_app
from dbdeck.errors import UsageError
from dbdeck.output import document as print_document
from dbdeck.run import dbdeck_argv

_UNKNOWN = 3


def _pair(app):
    from .pair import Pair

    return Pair(app)


def _size_option(ctx, param, value):
    from .model import parse_size

    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


class NagiosCommand(click.Command):
    """A bad flag is UNKNOWN (3) for a monitoring plugin: click's usual 2 would read as CRITICAL."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            click.echo(f"REPLICATION UNKNOWN - {exc.format_message()}")
            sys.exit(_UNKNOWN)


@click.command("check-replication", cls=NagiosCommand)
@click.option("--format", "output_format", type=click.Choice(["text", "json", "prometheus"]), default=None,
              help="text for people (default), json, or Prometheus text exposition (node_exporter textfile).")
@click.option("--warn-lag-bytes", callback=_size_option, metavar="SIZE",
              help="WARNING when a standby is this far behind (default 16MB, or replication.warn_lag_bytes).")
@click.option("--crit-lag-bytes", callback=_size_option, metavar="SIZE", help="CRITICAL over this many bytes.")
@click.option("--warn-lag-seconds", type=click.FloatRange(min=0), metavar="S", help="WARNING over this replay delay.")
@click.option("--crit-lag-seconds", type=click.FloatRange(min=0), metavar="S",
              help="CRITICAL over this replay delay (default 30, or replication.crit_lag_seconds).")
@click.option("--serve", metavar="[HOST]:PORT",
              help="Serve /metrics (Prometheus) until stopped (without HOST on 127.0.0.1 only; scrapes within a "
                   "second share one probe); nodes with a health_port also get /primary, /replica... there "
                   "(HAProxy's checks, as auto-failover answers them).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=5, show_default=True,
              help="Seconds to wait for each node.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the report to FILE atomically (node_exporter's textfile collector never reads half a file).")
@pass_app
def check_replication(app, output_format, warn_lag_bytes, crit_lag_bytes, warn_lag_seconds, crit_lag_seconds,
                      serve, timeout, output):
    """Which node is primary, each standby's state, LSNs, lag, slots, timeline, and a verdict.

    Exit codes follow Nagios: 0 OK, 1 WARNING, 2 CRITICAL (no standby, standby down, two primaries,
    lag over critical), 3 UNKNOWN (configuration or check error). Lag seconds are 0 when the standby
    has replayed everything, so an idle primary does not look behind.
    """
    from dbdeck.errors import DbdeckError

    from .cluster import STATUS_NAMES

    output_format = output_format or app.format
    try:
        pair = _pair(app)
        thresholds = pair.thresholds(warn_lag_bytes=warn_lag_bytes, crit_lag_bytes=crit_lag_bytes,
                                     warn_lag_seconds=warn_lag_seconds, crit_lag_seconds=crit_lag_seconds)

        def snapshot_and_status():
            snapshot, status, _, _ = pair.assess(thresholds, timeout)
            return snapshot, status

        if serve:
            _serve(app, serve, snapshot_and_status, pair, timeout)
            return
        snapshot, status, problems, patroni = pair.assess(thresholds, timeout)
    except DbdeckError as exc:
        from dbdeck import secrets

        message = secrets.mask(str(exc))
        if output_format == "json":
            print_document(json.dumps({"status": "UNKNOWN", "exit_code": _UNKNOWN, "problems": [message]},
                                      indent=2))
        else:
            click.echo(f"REPLICATION UNKNOWN - {message}")
        sys.exit(_UNKNOWN)

    if output_format == "prometheus":
        from .metrics import exposition

        report = exposition(snapshot, status)
    elif output_format == "json":
        from dbdeck import secrets

        document = {"status": STATUS_NAMES[status], "exit_code": status, "problems": problems,
                    "primary": snapshot.primary.name if snapshot.primary else None,
                    "manager": pair.settings.manager, **snapshot.as_dict()}
        if pair.patroni:
            document["patroni"] = patroni
        report = secrets.mask(json.dumps(document, indent=2, default=str)) + "\n"
    else:
        addresses = {node.name: f"{node.endpoint.host or 'local'}:{node.endpoint.port or 5432}" for node in pair.nodes}
        report = _text_report(snapshot, status, problems, thresholds, patroni, addresses) + "\n"
    if output:
        from dbdeck.state import write_atomic

        write_atomic(output, report)
    elif output_format == "json":
        print_document(report.rstrip("\n"))
    else:
        click.echo(report, nl=False)
    sys.exit(status)


def _serve(app, address, snapshot_and_status, pair, timeout):
    import signal
    import threading

    from .metrics import serve

    from dbdeck.errors import DbdeckError
    from dbdeck.httpserve import parse_address

    try:
        host, port = parse_address(address)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--serve") from None

    # before the first listener answers: from then on a SIGTERM is a clean stop (exit 0), not an interrupted run
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        health = _health_servers(pair, timeout)
    except DbdeckError as exc:
        # auto-failover on this host answers them already; the metrics are still worth serving
        click.echo(f"not answering health checks: {exc} (auto-failover running here answers them)", err=True)
        health = None
    try:
        server = serve(host, port, snapshot_and_status)
    except OSError as exc:
        if health:
            health.stop()
        raise DbdeckError(f"cannot serve metrics on {address}: {exc.strerror}") from None
    bound_host, bound_port = server.server_address[:2]
    app.announce("replication metrics", serving=f"http://{bound_host}:{bound_port}/metrics",
                 **({"health_checks": health.describe()} if health else {}))
    stop.wait()
    server.stop()
    if health:
        health.stop()


def _health_servers(pair, timeout):
    """The per-node /primary, /replica... listeners when nodes have a health_port (else None)."""
    if not any(node.config.health_port for node in pair.nodes):
        return None
    from .health import HealthServers

    health = HealthServers(pair, timeout)
    click.echo(f"answering health checks: {health.describe()}", err=True)
    return health


def _text_report(snapshot, status, problems, thresholds, patroni=None, addresses=None):
    from .cluster import STATUS_NAMES
    from .model import format_size

    summary = problems[0] if problems else (
        f"primary {snapshot.primary.name}, {sum(1 for s in snapshot.standbys if s.state == 'streaming')} standby "
        f"streaming")
    measured = [s for s in snapshot.standbys if s.lag_bytes is not None]
    # Nagios: a value that could not be measured is U, never a reassuring 0
    worst_bytes = f"{max(s.lag_bytes for s in measured)}B" if measured else "U"
    seconds = [s.lag_seconds for s in measured if s.lag_seconds is not None]
    worst_seconds = f"{max(seconds):.3f}s" if seconds else "U"
    perf = (f"lag_bytes={worst_bytes};{thresholds.warn_lag_bytes or ''};{thresholds.crit_lag_bytes or ''} "
            f"lag_seconds={worst_seconds};{thresholds.warn_lag_seconds or ''};{thresholds.crit_lag_seconds or ''}")
    lines = [f"REPLICATION {STATUS_NAMES[status]} - {summary} | {perf}"]
    # then a table like `patronictl list`: one row per member, then the slots, then the other problems
    from dbdeck.output import table

    streaming = {s.name: s for s in snapshot.standbys if s.state is not None}
    members = []
    for node in snapshot.nodes:
        row = {"member": node.name, "host": (addresses or {}).get(node.name)}
        standby = streaming.get(node.name)
        if not node.reachable:
            row.update(role="?", state="DOWN: " + str(node.error or "unreachable"))
        elif node.in_recovery:
            lag = f"{format_size(standby.lag_bytes)} / " + (
                "?" if standby.lag_seconds is None else f"{standby.lag_seconds:.1f}s") if standby else "?"
            row.update(role=node.role, state=f"{standby.state} ({standby.sync_state})" if standby else "not streaming",
                       tl=node.timeline, lsn=f"received {node.receive_lsn}, replayed {node.replay_lsn}", lag=lag)
        else:
            row.update(role=node.role, state="accepting writes", tl=node.timeline, lsn=node.current_lsn)
        members.append(row)
    lines.append(table(members, [("Member", "member"), ("Host", "host"), ("Role", "role"), ("State", "state"),
                                 ("TL", "tl"), ("LSN", "lsn"), ("Lag", "lag")]))
    slots = [{"on": node.name, **slot} for node in snapshot.nodes if node.role == "primary" for slot in node.slots]
    if slots:
        lines.append(table(slots, [
            ("Slot", "slot_name"), ("On", "on"), ("Active", lambda r: "yes" if r["active"] else "NO"),
            ("Retains", lambda r: format_size(r["retained_bytes"])), ("WAL status", "wal_status"),
            ("Safe WAL size",
             lambda r: "unlimited" if r["safe_wal_size"] is None else format_size(r["safe_wal_size"]))]))
    if (patroni or {}).get("members"):
        lines.append(table(patroni["members"], [("Member", "name"), ("Role", "role"), ("State", "state"),
                                                ("TL", "timeline"), ("Lag", "lag")], title="Patroni"))
    lines.extend(f"  ! {p}" for p in problems[1:])
    return "\n".join(lines)


@click.command("setup-master")
@click.option("--node", metavar="NAME", help="The primary (default: replication.primary, else the writable node).")
@click.option("--apply-settings", is_flag=True, help="Fix wrong settings with ALTER SYSTEM (some need a restart).")
@pass_app
def setup_master(app, node, apply_settings):
    """Prepare the primary for streaming replication (idempotent; --dry-run changes nothing).

    Creates the replication role with a password read from replication.replication_password_file, or
    generated and stored there with mode 0600 (never a default); adds the pg_hba entry for
    replication.replication_networks; creates the physical slot; checks wal_level, max_wal_senders,
    max_replication_slots, wal_keep_size, hot_standby and wal_log_hints, saying which need a restart
    (--apply-settings fixes them, except wal_keep_size: a disk trade-off it explains).
    """
    from .setup import setup_master as run

    pair = _pair(app)
    _native_only(pair, "setup-master", "Patroni creates the replication and rewind roles, slots and pg_hba from "
                                       "its configuration (dbdeck patroni render)")
    with pair.operator_lock():
        checks, restart = run(pair, node, apply_settings)
    if app.format == "json":
        app.emit({"settings": [vars(c) for c in checks], "restart_needed": restart})
    if restart:
        sys.exit(1)


def _native_only(pair, command, why):
    if pair.patroni:
        raise UsageError(f"{command} manages a native pair; replication.manager is patroni: {why}")


def _notify(app, kind, message):
    from dbdeck.events import Event

    app.notify(Event(kind, message, severity="warning"))


def _confirm(app, yes, question):
    """Ask on a terminal before changing roles or data; --yes, --dry-run and runs without a terminal
    (cron, CI, scripts) do not ask, so automation behaves as before."""
    if yes or app.dry_run or not (sys.stdin.isatty() and sys.stdout.isatty()):
        return
    click.confirm(question, abort=True)


@click.command("promote-replica")
@click.option("--node", metavar="NAME", help="The standby to promote (default: the only one).")
@click.option("--force", is_flag=True, help="Promote even though the primary still answers (split-brain risk).")
@click.option("--fence", is_flag=True,
              help="Stop every other node that accepts writes first, then promote --node: e.g. a copy restored "
                   "with `pitr restore` becomes the primary while the old one runs.")
@click.option("--update-connections", is_flag=True,
              help="Also rewrite DATABASE_URL in replication.after_promote.env_files and restart its services.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask on a terminal (runs without one never ask).")
@pass_app
def promote_replica(app, node, force, fence, update_connections, yes):
    """Emergency failover: promote the standby once the primary is down (seed's promote-replica.sh).

    Refuses while the primary still answers (unless --force, with a loud warning). Shows the standby's
    last received/replayed LSN, promotes it with pg_promote(), waits until it accepts writes, and prints
    what to change next. Logs to failover-YYYYMMDD-HHMMSS.log under replication.log_dir.
    """
    from dbdeck.errors import UsageError

    from .promote import promote_replica as run

    if fence and not node:
        raise UsageError("--fence needs --node NAME: the node that becomes the primary")
    _confirm(app, yes, f"Promote {node or 'the standby'} to primary (the old primary must not come back as one)"
                       + (", stopping every other node that accepts writes?" if fence else "?"))
    pair = _pair(app)
    if fence and pair.patroni:
        raise UsageError("--fence is for a native pair: under Patroni, promote-replica --force asks Patroni")
    with pair.operator_lock():
        with pair.run_log("failover"):
            if pair.patroni:
                from .patroni import failover

                promoted = failover(pair, node, force)
                if not app.dry_run:
                    _notify(app, "failover.promoted",
                            f"Patroni failed over to {promoted} (promote-replica)")
            else:
                run(pair, node, force, update_connections, fence=fence)


@click.command("rebuild-replica")
@click.option("--node", metavar="NAME", help="The node to rebuild (default: the one that is not the primary).")
@click.option("--rejoin", is_flag=True,
              help="Try pg_rewind first (fast, keeps unchanged files; says why when it cannot), else a base backup.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask on a terminal (runs without one never ask).")
@pass_app
def rebuild_replica(app, node, rejoin, yes):
    """Turn a node into a fresh streaming standby of the current primary (pg_basebackup -R with the slot).

    Stops the node, moves its data directory aside (deleted only after the new standby streams; put
    back if the copy fails), copies the primary, starts it and waits until it streams. Refuses to
    rebuild the only primary. Logs to rebuild-replica-YYYYMMDD-HHMMSS.log under replication.log_dir.
    """
    from .rebuild import choose_target, rebuild_replica as run

    _confirm(app, yes, f"Rebuild {node or 'the node that is not the primary'} from the primary "
                       f"(its current data directory is replaced)?")
    pair = _pair(app)
    with pair.operator_lock():
        with pair.run_log("rebuild-replica"):
            if pair.patroni:
                if rejoin:
                    raise UsageError("under Patroni a node rejoins by itself (use_pg_rewind); rebuild-replica "
                                     "without --rejoin asks Patroni to reinitialize it")
                from .patroni import reinitialize

                rebuilt = reinitialize(pair, node)
                if not app.dry_run:
                    _notify(app, "rebuild.done", f"Patroni reinitialized {rebuilt} (rebuild-replica)")
            elif rejoin:
                from .standby import rejoin as rejoin_node

                target, primary = choose_target(pair, pair.probe(), node)
                rejoin_node(pair, target, primary)
            else:
                run(pair, node)


@click.command("switchover")
@click.option("--max-lag", "max_lag", callback=_size_option, metavar="SIZE",
              help="Refuse when the standby is further behind (default replication.switchover_max_lag_bytes).")
@click.option("--timeout", type=click.IntRange(min=1), metavar="S",
              help="Seconds to wait for the standby to replay the shutdown checkpoint (default 30).")
@click.option("--candidate", metavar="NAME",
              help="The node to become primary (default: the standby; under Patroni the synchronous or least "
                   "lagging replica).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask on a terminal (runs without one never ask).")
@pass_app
def switchover(app, max_lag, timeout, candidate, yes):
    """Planned role swap with zero data loss (seed's switchover.sh); run it again to swap back.

    Pre-checks (standby streaming, lag, slot, pg_rewind prerequisites), blocks new writes, checkpoints and
    shuts the primary down cleanly, waits until the standby replayed its shutdown checkpoint (else
    restarts the old primary and aborts), promotes, and turns the old primary into a streaming standby
    of the new one (pg_rewind when needed). With HAProxy in front (replication.haproxy), it returns only
    once HAProxy's write port routes to the new primary. --dry-run runs the pre-checks and prints the plan.
    Logs to switchover-YYYYMMDD-HHMMSS.log under replication.log_dir.
    """
    from .switchover import switchover as run

    _confirm(app, yes, "Swap the roles of primary and standby (writes pause for a few seconds)?")
    pair = _pair(app)
    max_lag = max_lag if max_lag is not None else pair.settings.switchover_max_lag_bytes
    with pair.operator_lock():
        with pair.run_log("switchover"):
            if pair.patroni:
                from .patroni import switchover as patroni_switchover

                leader = patroni_switchover(pair, candidate, max_lag)
                if not app.dry_run:
                    _notify(app, "switchover.done", f"Patroni switched over to {leader}")
                return
            if candidate is not None:
                pair.node(candidate)
                current = pair.probe(3).primary
                if current is not None and current.name == candidate:
                    raise UsageError(f"--candidate {candidate}: that node is the primary already")
            run(pair, max_lag, timeout or pair.settings.switchover_timeout)


@click.command("auto-failover")
@click.option("--daemon", is_flag=True, help="Detach; output to auto-failover.log, pid in auto-failover.pid.")
@click.option("--interval", type=click.FloatRange(min=0, min_open=True), metavar="S",
              help="Seconds between checks (default 1).")
@click.option("--failures", type=click.IntRange(min=1), metavar="N",
              help="Consecutive failed checks before failing over (default 3; one refused connection with the "
                   "standby disconnected is enough).")
@click.option("--no-rejoin", is_flag=True, help="Leave the old primary fenced instead of rejoining it.")
@pass_app
def auto_failover(app, daemon, interval, failures, no_rejoin):
    """Monitor the primary and fail over to the standby when it is gone (seed's auto-failover.sh).

    A check is a new connection plus a query with a timeout. After N consecutive failures (or one refused
    connection: nothing listens), and only if the standby is healthy, not too far behind and no longer
    receives WAL (else the primary is alive and only this monitor lost it), the old primary is fenced
    (container restart policy off; standby.signal written, then an immediate stop, so it can only come back
    read-only), the standby gets its slot and is promoted, and the old primary rejoins as a standby
    (pg_rewind, else a base backup). One log line per state change; events go to the notify hook. It locks
    only to act: replication commands run meanwhile pause it (and wait for it while it acts).
    """
    import os
    import signal
    import threading

    pair = _pair(app)
    _native_only(pair, "auto-failover", "Patroni fails over by itself, and a second manager would fight it; "
                                        "`dbdeck status` and check-replication show Patroni's state")
    settings = pair.settings.auto_failover
    run_dir = app.config.core.run_dir
    from dbdeck.lock import default_run_dir

    pid_file = settings.pid_file or (run_dir or default_run_dir()) / "auto-failover.pid"
    if daemon:
        log_dir = pair.settings.log_dir or app.config.core.log_dir
        log_file = settings.log_file or (log_dir / "auto-failover.log" if log_dir else pid_file.with_suffix(".log"))
        log_file.parent.mkdir(parents=True, exist_ok=True)
        argv = dbdeck_argv("auto-failover")
        if app.config.path:
            argv += ["--config", str(os.path.abspath(app.config.path))]
        argv += [*(["--interval", interval] if interval else []), *(["--failures", failures] if failures else []),
                 *(["--no-rejoin"] if no_rejoin else []), *(["-v"] * app.verbosity)]
        process = app.runner.start_daemon(argv, log_path=log_file)
        if not app.dry_run:
            _wait_until_monitoring(app, process, log_file)
        app.emit({"service": "auto-failover", "pid": process.pid, "log": str(log_file), "pid_file": str(pid_file),
                  "background": True},
                 f"auto-failover running in the background (pid {process.pid}); log {log_file}; pid file {pid_file}")
        return
    from .failover import Monitor

    with app.lock("auto-failover"):
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(f"{os.getpid()}\n")
        monitor = Monitor(pair, interval=interval if interval is not None else settings.interval,
                          failures=failures if failures is not None else settings.failures,
                          timeout=settings.check_timeout, max_lag_bytes=settings.max_lag_bytes,
                          rejoin=settings.rejoin and not no_rejoin, lock=app.lock("replication"))
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        health = _health_servers(pair, settings.check_timeout)
        pair.say(f"auto-failover: checking every {monitor.interval:g}s, failover after {monitor.failures_needed} "
                 f"failed checks (timeout {monitor.timeout:g}s each)")
        if app.format == "json":
            app.announce("auto-failover", nodes=[node.name for node in pair.nodes], interval_seconds=monitor.interval,
                         failures_needed=monitor.failures_needed, pid_file=str(pid_file),
                         **({"health_checks": health.describe()} if health else {}))
        try:
            monitor.run(stop)
        finally:
            if health:
                health.stop()
            pid_file.unlink(missing_ok=True)
            pair.say("auto-failover stopped")


def _wait_until_monitoring(app, process, log_file):
    """Return once the background monitor holds its lock; if it ended instead, fail with its reason and
    exit code (a second monitor must not report 'running in the background')."""
    import time

    from dbdeck.errors import DbdeckError, LockBusy

    lock = app.lock("auto-failover")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        holder = lock.holder()
        if holder and holder.get("pid") == process.pid:
            return
        code = process.poll()
        if code is not None:
            try:
                lines = [line for line in log_file.read_text().splitlines() if line.strip()]
            except OSError:
                lines = []
            reason = lines[-1] if lines else f"exit status {code}"
            error = LockBusy(reason) if code == 75 else DbdeckError(f"auto-failover did not start: {reason}")
            raise error
        time.sleep(0.1)
    raise DbdeckError(f"auto-failover (pid {process.pid}) did not start monitoring within 30s; see {log_file}")
