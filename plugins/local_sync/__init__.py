"""local-sync plugin: main PostgreSQL -> per-tenant MySQL/MariaDB tables (seed 003)."""

from dbdeck.hookspecs import hookimpl


@hookimpl
def register_commands(cli):
    from .commands import local_sync

    cli.add_command(local_sync)


# the seed's environment variables -> keys of the section (known without importing the model)
SEED_ENVIRONMENT = {"DATABASE_URL": "source.dsn", "LOCAL_SYNC_LANGUAGE": "language"}


@hookimpl
def config_section():
    from dbdeck.config import ConfigSection

    return ConfigSection("local_sync", "dbdeck.plugins.local_sync.model:LocalSync", env=SEED_ENVIRONMENT,
                         description="main PostgreSQL -> tenant MySQL/MariaDB tables: instances, mappings")


@hookimpl
def scheduled_jobs(config):
    return [{"name": "local-sync", "command": ["local-sync"], "every": "6h",
             "enabled": config.given("local_sync"),
             "description": "main PostgreSQL into every tenant (seed: npm run sync:local every 6 hours)"}]


@hookimpl
def status_report(app):
    from dbdeck.status import service_items

    return service_items(app, "local-sync-watch")
