"""webhook-relay plugin: production webhooks forwarded to the primary and mirrored to dev (seed 000)."""

from dbdeck.hookspecs import hookimpl


@hookimpl
def register_commands(cli):
    from .commands import webhook_relay

    cli.add_command(webhook_relay)


# the seed's environment variables -> keys of the section (known without importing the model)
SEED_ENVIRONMENT = {
    "REPLICATE_WEBHOOKS_TO_DEV": "mirror_enabled",
    "DEV_WEBHOOK_URL": "mirror",
    "DEV_WEBHOOK_TIMEOUT": "mirror_timeout_ms",
}


@hookimpl
def config_section():
    from dbdeck.config import ConfigSection

    return ConfigSection("webhook_relay", "dbdeck.plugins.webhook_relay.model:WebhookRelay", env=SEED_ENVIRONMENT,
                         description="webhook relay: listen address, primary URL, dev mirror URL and timeout")


@hookimpl
def status_report(app):
    from dbdeck.status import service_items

    return service_items(app, "webhook-relay")
