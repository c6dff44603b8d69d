"""deploy plugin: Compose deploys with backup, versioned images, health check and rollback (seed 002)."""

from dbdeck.hookspecs import hookimpl


@hookimpl
def register_commands(cli):
    from .commands import backup, deploy

    cli.add_command(deploy)
    cli.add_command(backup)


@hookimpl
def config_section():
    from dbdeck.config import ConfigSection

    from .model import SEED_ENVIRONMENT, Deploy

    return ConfigSection("deploy", Deploy, env=SEED_ENVIRONMENT,
                         description="deploy profiles (production, staging...), the server and how to reach it")
