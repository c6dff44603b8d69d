"""`sync-databases setup | run | status | test-connection` (replaces scripts/sync_databases.py and friends)."""

import logging
import os
from pathlib import Path

import click

from dbdeck.cli import pass_app

log = logging.getLogger("dbdeck.sync_databases")

DIRECTIONS = {"local-to-external": [("local", "external")], "external-to-local": [("external", "local")],
              "both": [("local", "external"), ("external", "local")]}


def load_seed_env_file(path=".env.sync"):
    """The seed keeps EXTERNAL_DB_URL in .env.sync; the real environment wins over the file."""
    file = Path(os.environ.get("SYNC_ENV_FILE", path))
    if file.is_file():
        from dotenv import dotenv_values

        for key, value in dotenv_values(file).items():
            if value is not None and not os.environ.get(key):
                os.environ[key] = value


def make_sync(app):
    from .engine import Sync

    def say(line):
        log.info(line)
        # with --format json, stdout carries only the JSON document
        click.echo(("[dry-run] " if app.dry_run else "") + line, err=app.format == "json")

    return Sync(app, app.config.section("sync_databases"), say=say)


@click.group("sync-databases")
def sync_databases():
    """Keep tables equal between a local PostgreSQL and an external one, both ways.

    Changes are captured by triggers into <table>_changelog on each side and applied to the other side
    in bounded batches, last write wins on the timestamp column (deterministic tie-break), deletes
    included (tombstones). DATABASE_URL is the local side, EXTERNAL_DB_URL the external one (also read
    from .env.sync). Run `setup` once, then `run` every few minutes.
    """
    load_seed_env_file()


@sync_databases.command("setup")
@pass_app
def setup(app):
    """Create changelog, tombstone table and triggers on both sides (idempotent; --dry-run prints the DDL).

    Needs only ownership of the tables (no superuser), so it works on Neon and other managed services.
    """
    make_sync(app).setup()


@sync_databases.command("run")
@click.option("--direction", type=click.Choice(sorted(DIRECTIONS)), default="both", show_default=True,
              help="Which way to sync in this round.")
@pass_app
def run(app, direction):
    """One sync round (local -> external, then external -> local)."""
    with app.lock("sync-databases"):
        try:
            result = make_sync(app).run(DIRECTIONS[direction])
        except Exception as exc:
            app.record_result("sync-databases", "sync", False, str(exc).splitlines()[0])
            raise
    moved = sum(c.get("applied", 0) for c in result["directions"].values())
    app.record_result("sync-databases", "sync", True, f"{moved} change(s) applied in {result['seconds']}s",
                      result["seconds"], applied=moved)
    if app.format == "json":
        app.emit(result)


@sync_databases.command("status")
@pass_app
def status(app):
    """Pending changes per side and table, the last successful round, conflicts resolved."""
    result = make_sync(app).status()
    if app.format == "json":
        app.emit(result)
        return
    for side, info in result["sides"].items():
        if not info["reachable"]:
            click.echo(f"{side}: unreachable: {info['error']}")
            continue
        for table, counts in info["tables"].items():
            if counts["pending"] is None:
                click.echo(f"{side}: {table}: not set up (run sync-databases setup)")
            else:
                oldest = f", oldest since {counts['oldest_pending']}" if counts["pending"] else ""
                click.echo(f"{side}: {table}: {counts['pending']} pending change(s){oldest}")
    click.echo(f"last successful round: {result['last_success'] or 'never'}")
    click.echo(f"conflicts resolved: {result['conflicts_total']}")


@sync_databases.command("test-connection")
@pass_app
def test_connection(app):
    """Reach both sides: versions, pooled-URL warning, triggers present (the seed's test_sync_connection.py)."""
    from dbdeck.errors import DbdeckError

    from .engine import SIDES

    sync = make_sync(app)
    failed = False
    for side in SIDES:
        endpoint = sync.endpoints[side]
        host = endpoint.host or ""
        if "-pooler" in host:
            click.echo(f"{side}: WARNING: {host} is a pooled (-pooler) host; use the direct connection URL: "
                       f"triggers' session settings and long sync transactions need a real session")
        ok, detail = endpoint.ping()
        if not ok:
            click.echo(f"{side}: FAILED: {detail}")
            failed = True
            continue
        click.echo(f"{side}: OK, PostgreSQL {detail} ({endpoint.describe()})")
        try:
            with sync.connect(side) as connection:
                for names in sync.tables:
                    found = {row[0] for row in connection.execute(
                        "SELECT tgname FROM pg_trigger WHERE tgrelid = to_regclass(%s)",
                        (names.target.as_string(connection),)).fetchall()}
                    wanted = {names.table + "_sync_capture", names.table + "_sync_touch"}
                    if wanted <= found:
                        click.echo(f"{side}: {names.spec.name}: capture triggers present")
                    else:
                        click.echo(f"{side}: WARNING: {names.spec.name}: triggers missing "
                                   f"({', '.join(sorted(wanted - found))}); run sync-databases setup")
        except DbdeckError as exc:
            click.echo(f"{side}: FAILED: {exc}")
            failed = True
    if failed:
        raise SystemExit(1)
