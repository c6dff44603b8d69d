"""webhook-relay plugin: production webhooks forwarded to the primary and mirrored to dev (seed 000)."""

from dbdeck.hookspecs import hookimpl


@hookimpl
def register_commands(cli):
    from .commands import webhook_relay

    cli.add_command(webhook_relay)


@hookimpl
def config_section():
    from dbdeck.config import ConfigSection

    from .model import SEED_ENVIRONMENT, WebhookRelay

    return ConfigSection("webhook_relay", WebhookRelay, env=SEED_ENVIRONMENT,
                         description="webhook relay: listen address, primary URL, dev mirror URL and timeout")


@hookimpl
def status_report(app):
    from dbdeck.status import service_items

    return service_items(app, "webhook-relay")
