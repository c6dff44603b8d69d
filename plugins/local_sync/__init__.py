"""local-sync plugin: main PostgreSQL -> per-tenant MySQL/MariaDB tables (seed 003)."""

from dbdeck.hookspecs import hookimpl


@hookimpl
def register_commands(cli):
    from .commands import local_sync

    cli.add_command(local_sync)


@hookimpl
def config_section():
    from dbdeck.config import ConfigSection

    from .model import SEED_ENVIRONMENT, LocalSync

    return ConfigSection("local_sync", LocalSync, env=SEED_ENVIRONMENT,
                         description="main PostgreSQL -> tenant MySQL/MariaDB tables: instances, mappings")
