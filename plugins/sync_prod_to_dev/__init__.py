"""sync-prod-to-dev plugin: atomic prod -> dev database clone (seed 000)."""

from dbdeck.hookspecs import hookimpl


@hookimpl
def register_commands(cli):
    from .commands import sync_prod_to_dev

    cli.add_command(sync_prod_to_dev)


@hookimpl
def config_section():
    from dbdeck.config import ConfigSection

    from .model import SEED_ENVIRONMENT, SyncProdToDev

    return ConfigSection("sync_prod_to_dev", SyncProdToDev, env=SEED_ENVIRONMENT,
                         description="prod -> dev clone: source, target, excluded tables, logs, dumps")
