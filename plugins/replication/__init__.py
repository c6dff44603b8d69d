"""replication plugin: check-replication, setup-master, promote-replica, rebuild-replica (seed 004)."""

from dbdeck.hookspecs import hookimpl


@hookimpl
def register_commands(cli):
    from .commands import (auto_failover, check_replication, promote_replica, rebuild_replica, setup_master,
                           switchover)

    from .pitr_commands import pitr, rotate_replication_password
    from .routing_commands import haproxy, patroni

    for command in (check_replication, setup_master, promote_replica, rebuild_replica, switchover, auto_failover,
                    pitr, rotate_replication_password, haproxy, patroni):
        cli.add_command(command)


@hookimpl
def config_section():
    from dbdeck.config import ConfigSection

    return ConfigSection("replication", "dbdeck.plugins.replication.model:Replication",
                         description="streaming replication pair: nodes, drivers, replication user, slot, lag limits")


@hookimpl
def scheduled_jobs(config):
    backup = config.section("replication").backup if config.given("replication") else None
    enabled = backup is not None
    backup = backup or _default_backup()
    return [
        {"name": "pitr-maintain", "command": ["pitr", "maintain"], "every": "1m", "enabled": enabled,
         "description": "Barman's WAL receiver, archiving and retention (barman cron); follow the primary"},
        {"name": "pitr-backup", "command": ["pitr", "create"], "cron": backup.schedule, "enabled": enabled,
         "description": "a base backup of the primary (Barman)"},
        {"name": "pitr-verify", "command": ["pitr", "verify"], "cron": backup.verify_schedule, "enabled": enabled,
         "description": "restore the latest backup and a point in time into a throwaway cluster and check it"},
    ]


def _default_backup():
    from .model import Backup

    return Backup()


@hookimpl
def history_entries(app):
    """Patroni's /history: the promotions Patroni made on its own appear beside dbdeck's events."""
    from dbdeck.errors import DbdeckError

    if not app.config.given("replication") or app.config.section("replication").manager != "patroni":
        return []
    from .commands import _pair
    from .patroni import history

    try:
        return history(_pair(app))
    except DbdeckError as exc:
        return [{"at": "", "ts": 0, "kind": "patroni.unreachable", "severity": "warning",
                 "message": f"Patroni's history could not be read: {exc}", "details": {}}]


@hookimpl
def status_report(app):
    from dbdeck.status import service_items

    patroni = app.config.given("replication") and app.config.section("replication").manager == "patroni"
    # under Patroni, Patroni fails over: its members' state replaces the auto-failover service row
    items = [] if patroni else service_items(app, "auto-failover")
    if app.config.given("replication"):
        backup = _backup_items(app) if app.config.section("replication").backup is not None else []
        items[0:0] = _verdict(app) + backup
    return items


def _backup_items(app):
    """Last base backup, WAL chain, last verified restore: from dbdeck's record beside Barman's files."""
    from dbdeck.errors import DbdeckError
    from dbdeck.status import Item, epoch

    from .backup import backup_problems
    from .barman import Barman
    from .commands import _pair

    try:
        barman = Barman(_pair(app))
    except DbdeckError as exc:
        return [Item(kind="backup", name="pitr", state="failing", detail=str(exc).splitlines()[0])]
    state = barman.state.read()
    last = state.get("last_backup") or {}
    chain = state.get("chain") or {}
    verified = state.get("last_verify") or {}
    problems = backup_problems(barman)
    stale = [p for p in problems if "base backup" in p and "hole" not in p]
    hole = [p for p in problems if "hole" in p or "receiver" in p]
    receiver = state.get("receiver") or {}
    verify_problems = [p for p in problems if "verif" in p]
    labels = {"server": barman.name}
    return [
        Item(kind="backup", name="pitr-backup", state="stale" if stale else "ok",
             detail=stale[0] if stale else f"base backup {last.get('id')}", last=last.get("end"), labels=labels,
             metrics={"dbdeck_backup_last_success_timestamp_seconds": epoch(last.get("end"))},
             data={"backup": last}),
        Item(kind="backup", name="pitr-wal", state="failing" if hole else "ok",
             detail=hole[0] if hole else f"streaming from {(state.get('server') or {}).get('primary', '?')}",
             labels=labels, metrics={"dbdeck_backup_wal_chain_complete": 0 if any("hole" in p for p in hole) else 1,
                                     "dbdeck_backup_wal_streaming": 1 if receiver.get("streaming") else 0},
             data={"chain": chain, "receiver": receiver}),
        Item(kind="backup", name="pitr-verify",
             state="stale" if verify_problems else "ok" if verified else "never",
             detail=verify_problems[0] if verify_problems else verified.get("summary") or
             "no restore verified yet: run `dbdeck pitr verify` (the scheduled job does, weekly by default)",
             last=verified.get("at"),
             labels=labels,
             metrics={"dbdeck_backup_last_verified_timestamp_seconds": epoch(verified.get("last_success"))},
             data={"verify": verified}),
    ]


def _verdict(app):
    """The check-replication verdict as one row (the same evaluation, the configured thresholds)."""
    from dbdeck.errors import DbdeckError
    from dbdeck.status import Item

    from .cluster import OK, STATUS_NAMES, WARNING
    from .commands import _pair

    try:
        pair = _pair(app)
        snapshot, status, problems, patroni = pair.assess(pair.thresholds(), 5)
    except DbdeckError as exc:
        return [Item(kind="replication", name="pair", state="failing", detail=str(exc).splitlines()[0])]
    primary = snapshot.primary.name if snapshot.primary else "none"
    detail = f"{STATUS_NAMES[status]}: primary {primary}" + (f"; {problems[0]}" if problems else "")
    item = Item(kind="replication", name="pair", state="ok" if status == OK else
                "warning" if status == WARNING else "failing", detail=detail,
                data={"status": STATUS_NAMES[status], "problems": problems, "primary": primary})
    if not pair.patroni:
        return [item]
    from .patroni import RUNNING, leader_of

    members = (patroni or {}).get("members", [])
    healthy = patroni and leader_of(patroni) and not patroni.get("pause") and all(
        m.get("state") in RUNNING for m in members)
    return [item, Item(kind="replication", name="patroni", state="ok" if healthy else "failing",
        detail="; ".join(f"{m['name']} {m.get('role')} {m.get('state')}" for m in members)
        or "no Patroni REST API answers", labels={"scope": pair.settings.patroni.scope},
        data={"cluster": patroni})]
