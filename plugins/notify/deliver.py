"""Sending one event; every failure is logged, never raised."""

import json
import logging
import socket

from dbdeck import secrets

log = logging.getLogger("dbdeck.notify")


def payload(event):
    return {"text": f"[dbdeck {event.severity}] {event.message}", "kind": event.kind, "severity": event.severity,
            "message": event.message, "details": event.details, "at": event.at, "host": socket.gethostname()}


def deliver(event, settings):
    body = secrets.mask(json.dumps(payload(event), default=str))
    if settings.webhook_url:
        _post(settings.webhook_url.get_secret_value(), settings.webhook_shown(), body, settings.timeout_s)
    if settings.command:
        _run(settings.command, body, settings.timeout_s)


def _post(url, shown, body, timeout):
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body.encode(), method="POST",
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.warning("notify: webhook %s failed: %s", shown, secrets.mask(str(exc)).replace(url, shown))


def _run(command, body, timeout):
    from dbdeck.errors import DbdeckError
    from dbdeck.run import Runner

    try:
        Runner().run(command, stdin=body, timeout=max(timeout, 1))
    except DbdeckError as exc:
        log.warning("notify: command failed: %s", exc)
