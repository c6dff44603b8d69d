"""replication plugin: check-replication, setup-master, promote-replica, rebuild-replica (seed 004)."""

from dbdeck.hookspecs import hookimpl


@hookimpl
def register_commands(cli):
    from .commands import (auto_failover, check_replication, promote_replica, rebuild_replica, setup_master,
                           switchover)

    for command in (check_replication, setup_master, promote_replica, rebuild_replica, switchover, auto_failover):
        cli.add_command(command)


@hookimpl
def config_section():
    from dbdeck.config import ConfigSection

    from .model import Replication

    return ConfigSection("replication", Replication,
                         description="streaming replication pair: nodes, drivers, replication user, slot, lag limits")


@hookimpl
def status_report(app):
    from dbdeck.status import service_items

    items = service_items(app, "auto-failover")
    if app.config.given("replication"):
        items.insert(0, _verdict(app))
    return items


def _verdict(app):
    """The check-replication verdict as one row (the same evaluation, the configured thresholds)."""
    from dbdeck.errors import DbdeckError
    from dbdeck.status import Item

    from . import synchronous
    from .cluster import OK, STATUS_NAMES, WARNING, Thresholds, evaluate
    from .commands import _pair

    try:
        pair = _pair(app)
        s = pair.settings
        thresholds = Thresholds(warn_lag_bytes=s.warn_lag_bytes, crit_lag_bytes=s.crit_lag_bytes,
                                warn_lag_seconds=s.warn_lag_seconds, crit_lag_seconds=s.crit_lag_seconds,
                                synchronous_standby_names=synchronous.wanted(pair))
        snapshot = pair.probe(5)
        status, problems = evaluate(snapshot, thresholds)
    except DbdeckError as exc:
        return Item(kind="replication", name="pair", state="failing", detail=str(exc).splitlines()[0])
    primary = snapshot.primary.name if snapshot.primary else "none"
    detail = f"{STATUS_NAMES[status]}: primary {primary}" + (f"; {problems[0]}" if problems else "")
    return Item(kind="replication", name="pair", state="ok" if status == OK else
                "warning" if status == WARNING else "failing", detail=detail,
                data={"status": STATUS_NAMES[status], "problems": problems, "primary": primary})
