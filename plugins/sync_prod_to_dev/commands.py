"""`sync-prod-to-dev [--dry-run] [--force]` (drop-in for deploy-backend/scripts/sync-prod-to-dev.sh)."""

import logging
import time

import click

from dbdeck.cli import pass_app

log = logging.getLogger("dbdeck.sync_prod_to_dev")


@click.command("sync-prod-to-dev")
@click.option("--force", is_flag=True, help="Copy even when prod has not changed since the last sync.")
@pass_app
def sync_prod_to_dev(app, force):
    """Copy the production database into the development one, atomically.

    The new copy is built in a staging database beside dev and swapped in by rename, so dev is always
    either the old copy or the complete new one. Tables in EXCLUDE_TABLES keep dev's own copy. Refuses a
    target marked role: production, or the same database on both sides. Skips quickly when prod has not
    changed since the last sync. PROD_DB_CONTAINER, PROD_DATABASE, PROD_DB_USER, DEV_DB_CONTAINER,
    DEV_DATABASE, DEV_DB_USER and EXCLUDE_TABLES work as in the script.
    """
    from dbdeck import log as log_module
    from dbdeck import output

    from .clone import Clone

    settings = app.config.section("sync_prod_to_dev")
    log_dir = settings.log_dir or app.config.core.log_dir
    if log_dir and not app.dry_run:
        log_module.add_daily_file(log_dir, "sync")

    def say(line):
        log.info(line)
        output.line(("[dry-run] " if app.dry_run else "") + line)

    started = time.monotonic()
    with app.lock("sync-prod-to-dev"):
        try:
            result = Clone(app, settings, force=force, say=say).run()
        except Exception as exc:
            app.record_result("sync-prod-to-dev", "sync", False, str(exc).splitlines()[0],
                              round(time.monotonic() - started, 2))
            raise
    if result.get("skipped"):
        app.record_result("sync-prod-to-dev", "sync", True, f"prod unchanged since {result['last_sync']}",
                          round(time.monotonic() - started, 2), copied=False)
    else:
        size = f"{result['bytes'] / 1e6:.1f} MB " if result.get("bytes") is not None else ""
        app.record_result("sync-prod-to-dev", "sync", True, f"copied {size}in {result['seconds']}s",
                          result["seconds"], copied=True, bytes=result.get("bytes"))
    if app.format == "json":
        app.emit(result)
