"""sync-prod-to-dev plugin: atomic prod -> dev database clone (seed 000)."""

from dbdeck.hookspecs import hookimpl


@hookimpl
def register_commands(cli):
    from .commands import sync_prod_to_dev

    cli.add_command(sync_prod_to_dev)


# the seed's environment variables -> keys of the section (known without importing the model)
SEED_ENVIRONMENT = {
    "PROD_DB_CONTAINER": "source.container",
    "PROD_DATABASE": "source.database",
    "PROD_DB_USER": "source.user",
    "DEV_DB_CONTAINER": "target.container",
    "DEV_DATABASE": "target.database",
    "DEV_DB_USER": "target.user",
    "EXCLUDE_TABLES": "exclude_tables",
    "ANONYMIZE_SALT": "anonymize_salt",
}


@hookimpl
def config_section():
    from dbdeck.config import ConfigSection

    return ConfigSection("sync_prod_to_dev", "dbdeck.plugins.sync_prod_to_dev.model:SyncProdToDev",
                         env=SEED_ENVIRONMENT,
                         description="prod -> dev clone: source, target, excluded tables, logs, dumps")


@hookimpl
def scheduled_jobs(config):
    # the seed's cron job (setup-sync-cron.sh); most runs find prod unchanged and skip in well under a second
    return [{"name": "sync-prod-to-dev", "command": ["sync-prod-to-dev"], "every": "5m",
             "enabled": config.given("sync_prod_to_dev"),
             "description": "copy prod into dev when prod changed (seed: setup-sync-cron.sh)"}]
