"""sync-databases plugin: bidirectional PostgreSQL <-> PostgreSQL table sync (seed 001)."""

from dbdeck.hookspecs import hookimpl


@hookimpl
def register_commands(cli):
    from .commands import sync_databases

    cli.add_command(sync_databases)


@hookimpl
def config_section():
    from dbdeck.config import ConfigSection

    from .model import SEED_ENVIRONMENT, SyncDatabases

    return ConfigSection("sync_databases", SyncDatabases, env=SEED_ENVIRONMENT,
                         description="bidirectional sync: local and external databases, tables, batches")
