"""deploy plugin: Compose deploys with backup, versioned images, health check and rollback (seed 002)."""

from dbdeck.hookspecs import hookimpl


@hookimpl
def register_commands(cli):
    from .commands import backup, deploy

    cli.add_command(deploy)
    cli.add_command(backup)


# the seed's environment variables -> keys of the section (known without importing the model)
SEED_ENVIRONMENT = {
    "VPS_HOST": "server.host",
    "VPS_USER": "server.user",
    "VPS_PATH": "server.path",
    "DEPLOY_SSH_KEY_FILE": "server.key_file",
    "DEPLOY_KNOWN_HOSTS": "server.known_hosts",
}


@hookimpl
def config_section():
    from dbdeck.config import ConfigSection

    return ConfigSection("deploy", "dbdeck.plugins.deploy.model:Deploy", env=SEED_ENVIRONMENT,
                         description="deploy profiles (production, staging...), the server and how to reach it")
