"""`dbdeck pitr ...` (Barman backups and point-in-time recovery) and `rotate-replication-password`."""

import sys
from contextlib import nullcontext

import click

from dbdeck.cli import pass_app

from .commands import _confirm, _pair


@click.group("pitr")
def pitr():
    """Physical backups and point-in-time recovery of the replication pair, kept by Barman.

    Barman (Debian package `barman`) streams the primary's WAL through a replication slot and takes
    base backups with pg_basebackup; dbdeck writes its configuration from `replication.backup`, follows
    the primary after a failover, and proves restores with `pitr verify`. The verbs match `backup`
    (the app database's pre-deploy dumps): list, create, restore.

    \b
    dbdeck pitr setup                 configure Barman, start WAL streaming, take the first base backup
    dbdeck pitr create                a base backup now
    dbdeck pitr list                  base backups with sizes, ages, WAL range; the recovery window
    dbdeck pitr check                 Barman's checks + backup age, WAL chain, last verified restore
    dbdeck pitr restore --to-time T --target DIR|NODE
    dbdeck pitr verify                restore into a throwaway cluster and check it (weekly job)
    dbdeck pitr maintain              barman cron, follow the primary (job, each minute)
    """


def _pair_with_backup(app):
    from .barman import settings_of

    pair = _pair(app)
    settings_of(pair)
    return pair


@pitr.command("setup")
@click.option("--no-backup", is_flag=True, help="Do not take the first base backup.")
@pass_app
def pitr_setup(app, no_backup):
    """Configure Barman for the current primary and check it (idempotent).

    Grants the replication role what base backups need, creates Barman's slot (reserved), writes Barman's
    files under replication.backup.home, starts the WAL receiver, archives a first WAL segment, takes the
    first base backup, then reports `barman check` (a clear list of what fails).
    """
    from .backup import setup

    pair = _pair_with_backup(app)
    with pair.operator_lock():
        report = setup(pair, first_backup=not no_backup)
    app.emit(report, lambda: "barman check: OK" if report.get("ok") else
             "barman check: FAILED: " + ", ".join(report.get("failing", [])))
    if not report.get("ok"):
        sys.exit(1)


@pitr.command("create")
@pass_app
def pitr_create(app):
    """Take a base backup now (barman backup --wait): complete when its last WAL is archived."""
    from .backup import create

    pair = _pair_with_backup(app)
    with app.lock("pitr-backup") if not app.dry_run else nullcontext():
        result = create(pair)
    app.emit(result, lambda: f"base backup {result.get('backup_id')} done" if not app.dry_run else "dry run")


@pitr.command("list")
@pass_app
def pitr_list(app):
    """Base backups, newest first: end time, age, size, WAL size, WAL range, timeline; the recovery window."""
    from .backup import listing, render_listing

    data = listing(_pair_with_backup(app))
    app.emit(data, lambda: render_listing(data))


@pitr.command("check")
@pass_app
def pitr_check(app):
    """Barman's checks and dbdeck's (last backup age, WAL chain after a failover, last verified restore).
    Exit 0 when all pass, 1 otherwise."""
    from .backup import check

    report = check(_pair_with_backup(app))
    app.emit(report, lambda: "pitr: OK" if report["ok"] else "pitr: PROBLEMS:\n  " + "\n  ".join(report["problems"]))
    if not report["ok"]:
        sys.exit(1)


@pitr.command("restore")
@click.option("--to-time", metavar="TIME", help="Restore to this moment (ISO 8601; no offset = local time).")
@click.option("--latest", is_flag=True, help="Restore everything Barman has (the last WAL received).")
@click.option("--target", required=True, metavar="DIR|NODE",
              help="A new (or empty) absolute directory, or a stopped node's name (its files are kept aside).")
@click.option("--allow-primary", is_flag=True, help="Allow --target to be the primary's node (stopped).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask on a terminal (runs without one never ask).")
@pass_app
def pitr_restore(app, to_time, latest, target, allow_primary, yes):
    """Restore a base backup and replay WAL up to --to-time (or --latest) into --target.

    Never writes under a running server, never into a non-empty directory; a node's current files are moved
    aside (put back if the restore fails). The restored copy starts alone: no synchronous standby, no
    archiving, no primary_conninfo. --dry-run shows the backup chosen and Barman's command.
    """
    from dbdeck.errors import UsageError

    from .backup import parse_target_time, restore

    if bool(to_time) == bool(latest):
        raise UsageError("give exactly one of --to-time TIME and --latest")
    moment = parse_target_time(to_time) if to_time else None
    pair = _pair_with_backup(app)
    if target in {n.name for n in pair.nodes}:
        _confirm(app, yes, f"Replace {target}'s data directory with the restored copy (its files are kept aside)?")
    with pair.operator_lock():
        result = restore(pair, target, to_time=moment, allow_primary=allow_primary)
    app.emit(result, lambda: f"restored into {result['target']}" if not app.dry_run else "dry run: nothing changed")


@pitr.command("verify")
@click.option("--keep", is_flag=True, help="Leave the restored copies running (to look at them); say where.")
@pass_app
def pitr_verify(app, keep):
    """Prove the backups restore: the latest backup's files against its manifest, then the latest state and
    a moment inside the recovery window restored into throwaway clusters that must start, finish
    recovery, pass pg_amcheck and answer replication.backup.checks. Recorded for `dbdeck status`."""
    from .backup import verify

    pair = _pair_with_backup(app)
    with app.lock("pitr-verify") if not app.dry_run else nullcontext():
        result = verify(pair, keep=keep)
    app.emit(result, lambda: result.get("summary", "dry run"))


@pitr.command("maintain")
@pass_app
def pitr_maintain(app):
    """barman cron (WAL receiver, archiving, retention), Barman following the primary after a failover and
    the base backup that closes the WAL chain. The scheduled job runs it every minute."""
    from .backup import maintain

    pair = _pair_with_backup(app)
    with app.lock("pitr-maintain") if not app.dry_run else nullcontext():
        result = maintain(pair)
    app.emit(result, lambda: "pitr: OK" if not result["problems"] else "pitr: " + "; ".join(result["problems"]))


@click.command("rotate-replication-password")
@click.option("--yes", "-y", is_flag=True, help="Do not ask on a terminal (runs without one never ask).")
@pass_app
def rotate_replication_password(app, yes):
    """Give the replication role a new random password, everywhere it is used, with no rebuild.

    A new secret in the password file (0600), ALTER ROLE with only its SCRAM verifier sent, every standby's
    primary_conninfo rewritten and reloaded (PostgreSQL 13+ reconnects without a restart), Barman's pgpass
    rewritten and its receiver restarted; then each standby must stream again and Barman's receiver run.
    Any failure puts the old secret back everywhere.
    """
    from .rotate import rotate

    from .commands import _native_only

    pair = _pair(app)
    _native_only(pair, "rotate-replication-password",
                 "Patroni owns the replication role: change PATRONI_REPLICATION_PASSWORD in env.conf on every "
                 "node, ALTER ROLE on the leader, then restart Patroni node by node")
    _confirm(app, yes, "Rotate the replication password (standbys reconnect once)?")
    with pair.operator_lock():
        with pair.run_log("rotate-replication-password"):
            result = rotate(pair)
    app.emit(result, lambda: "dry run: nothing changed" if result.get("dry_run") else
             f"replication password rotated; streaming again: {', '.join(result['streaming'])}")
