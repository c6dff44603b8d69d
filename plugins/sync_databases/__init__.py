"""sync-databases plugin: bidirectional PostgreSQL <-> PostgreSQL table sync (seed 001)."""

from dbdeck.hookspecs import hookimpl


@hookimpl
def register_commands(cli):
    from .commands import sync_databases

    cli.add_command(sync_databases)


# the seed's environment variables -> keys of the section (known without importing the model)
SEED_ENVIRONMENT = {"DATABASE_URL": "local.dsn", "EXTERNAL_DB_URL": "external.dsn"}


@hookimpl
def config_section():
    from dbdeck.config import ConfigSection

    return ConfigSection("sync_databases", "dbdeck.plugins.sync_databases.model:SyncDatabases", env=SEED_ENVIRONMENT,
                         description="bidirectional sync: local and external databases, tables, batches")


@hookimpl
def scheduled_jobs(config):
    # seed 001 looped `sleep 300`; one round per run, under the job lock, replaces the loop
    return [{"name": "sync-databases", "command": ["sync-databases", "run"], "every": "5m",
             "enabled": config.given("sync_databases"),
             "description": "one bidirectional sync round (seed: sync_databases loop every 5 min)"}]
