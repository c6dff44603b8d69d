"""`local-sync [--instance NAME] [--full]`, `local-sync status | watch | setup` (replaces npm run sync:local)."""

import logging
import sys

import click

from dbdeck.cli import App, pass_app
from dbdeck.errors import EXIT_FAILED, EXIT_LOCKED

log = logging.getLogger("dbdeck.local_sync")


def make_sync(app, quiet=False):
    from .engine import LocalSync

    def echo(line):
        if quiet:
            log.debug(line)
        else:
            # with --format json, stdout carries only the JSON document
            click.echo(("[dry-run] " if app.dry_run else "") + line, err=app.format == "json")

    return LocalSync(app, app.config.section("local_sync"), echo)


@click.group("local-sync", invoke_without_command=True)
@click.option("--instance", "-i", metavar="NAME", help="Sync only this instance (tenant).")
@click.option("--full", is_flag=True, help="Complete resync: the tenant tables end equal to the source queries.")
@click.pass_context
def local_sync(ctx, instance, full):
    """Sync the main PostgreSQL database into each tenant's MySQL/MariaDB tables.

    With no subcommand: every instance (or --instance NAME), each table incremental after its first
    full sync (rows changed since the watermark stored in the tenant database), --full to resync
    everything. Tables missing in a tenant are created with the seed's DDL. One failing instance
    does not stop the others; the exit code is 1 when any failed.

    \b
    local-sync                      all instances (npm run sync:local)
    local-sync --instance exatron   one instance (npm run sync:local:instance exatron)
    local-sync --full --dry-run     what a full resync would do, changing nothing
    local-sync status               last sync, rows on both sides, lag, per instance and table
    local-sync setup                triggers on the main database for deletions and watch
    local-sync watch                near real-time: LISTEN/NOTIFY, catch-up after restarts
    """
    if ctx.invoked_subcommand is not None:
        return
    _run(ctx.ensure_object(App), instance, full)


def _run(app, instance, full):
    try:
        result = make_sync(app).run(instance, full)
    except Exception as exc:
        app.record_result("local-sync", "sync", False, str(exc).splitlines()[0])
        raise
    if not instance:
        done = len(result["instances"]) - len(result["failed"]) - len(result["skipped"])
        summary = f"{done} of {len(result['instances'])} instance(s) synced in {result['seconds']}s" + (
            f"; failed: {', '.join(result['failed'])}" if result["failed"] else "")
        app.record_result("local-sync", "sync", not result["failed"], summary, result["seconds"],
                          failed=result["failed"])
    if app.format == "json":
        app.emit(result)
    if result["failed"]:
        sys.exit(EXIT_FAILED)
    if instance and result["skipped"]:
        sys.exit(EXIT_LOCKED)


@local_sync.command("status")
@click.option("--instance", "-i", metavar="NAME", help="Only this instance.")
@pass_app
def status(app, instance):
    """Per instance and table: last sync and its mode, rows in the source and the tenant, lag."""
    rows = make_sync(app).status(instance)

    def text():
        lines = []
        for entry in rows:
            if not entry["reachable"]:
                lines.append(f"{entry['instance']}: UNREACHABLE: {entry['error']}")
                continue
            lines.append(f"{entry['instance']}: {entry['target']}")
            for table, info in entry["tables"].items():
                last = info["last_sync"] or "never"
                lag = f", lag {info['lag_seconds']}s" if info["lag_seconds"] is not None else ""
                target_rows = "missing" if info["target_rows"] is None else info["target_rows"]
                lines.append(f"  {table:<22} last sync {last} ({info['last_mode'] or '-'}){lag}; "
                             f"rows: source {info['source_rows']}, tenant {target_rows}")
        return "\n".join(lines)

    app.emit(rows, text)
    if not all(entry["reachable"] for entry in rows):
        sys.exit(EXIT_FAILED)


@local_sync.command("setup")
@pass_app
def setup(app):
    """Install, on the main database, the triggers that capture deletions and send NOTIFYs for watch.

    Idempotent; needs ownership of the source tables; --dry-run prints the DDL. Without it,
    incremental runs still see inserts and updates, but removed rows (a sector taken off a contact)
    reach the tenants only with full syncs, and watch falls back to its periodic rounds.
    """
    make_sync(app).setup()
    if not app.dry_run:
        click.echo("local-sync: capture and notify triggers installed on the main database")


@local_sync.command("watch")
@click.option("--instance", "-i", metavar="NAME", help="Only this instance.")
@pass_app
def watch(app, instance):
    """Keep tenants current in near real time (LISTEN/NOTIFY, catch-up rounds after restarts).

    Runs until SIGTERM/SIGINT. Each wake-up runs one incremental round; changed tables are logged.
    """
    from .watch import Watcher

    if app.dry_run:
        app.runner.say("would listen for NOTIFYs on the main database and run an incremental round for each burst; "
                       "one round now:")
        _run(app, instance, False)
        return
    def report(line):
        log.info(line)
        click.echo("[LocalSync] " + line, err=True)

    watcher = Watcher(make_sync(app, quiet=True), instance, report)
    watcher.install_signal_handlers()
    with app.lock("local-sync-watch" + (f".{instance}" if instance else "")):
        if app.format == "json":
            app.announce("local-sync watch", instances=instance or "all")
        watcher.run()
