"""notify plugin: deliver events (deploy rolled back, failover, sync failed) to a webhook and/or a command.

    notify:
      webhook_url: ${DBDECK_NOTIFY_WEBHOOK:-}   # POST JSON; "text" makes it Slack/Mattermost-compatible
      command: [/usr/local/bin/page-oncall]     # gets the event as JSON on stdin
      min_severity: warning                     # info | warning | critical

Delivery never raises: a dead webhook is logged, and the command that reported the event goes on.
"""

import logging

from dbdeck.hookspecs import hookimpl

log = logging.getLogger("dbdeck.notify")
SEVERITIES = ("info", "warning", "critical")


@hookimpl
def config_section():
    from dbdeck.config import ConfigSection

    return ConfigSection("notify", "dbdeck.plugins.notify.model:Notify", env={"DBDECK_NOTIFY_WEBHOOK": "webhook_url"},
                         description="where events go: a webhook URL and/or a command (event JSON on stdin)")


@hookimpl
def notify(event, config):
    if config is None:
        return
    settings = config.section("notify")
    if SEVERITIES.index(event.severity if event.severity in SEVERITIES else "info") < \
            SEVERITIES.index(settings.min_severity):
        return
    from .deliver import deliver

    deliver(event, settings)
