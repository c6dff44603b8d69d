"""`webhook-relay --listen HOST:PORT --primary URL --mirror URL` (the seed's webhook replication)."""

import logging
import signal
import threading

import click

from dbdeck.cli import pass_app
from dbdeck.errors import UsageError

log = logging.getLogger("dbdeck.webhook_relay")


@click.command("webhook-relay")
@click.option("--listen", metavar="HOST:PORT", help="Address to receive webhooks on (default 127.0.0.1:3080).")
@click.option("--primary", metavar="URL", help="Where webhooks really go; its response is returned unchanged.")
@click.option("--mirror", metavar="URL", help="Dev URL that gets a copy (DEV_WEBHOOK_URL).")
@click.option("--mirror-timeout", "mirror_timeout_ms", type=click.IntRange(min=1), metavar="MS",
              help="Timeout of each copy to dev in milliseconds (DEV_WEBHOOK_TIMEOUT, default 5000).")
@click.option("--no-mirror", is_flag=True, help="Forward only (REPLICATE_WEBHOOKS_TO_DEV=false).")
@pass_app
def webhook_relay(app, listen, primary, mirror, mirror_timeout_ms, no_mirror):
    """Forward production webhooks to the primary and mirror a copy to dev.

    Each request is forwarded to --primary and the primary's status, headers and body are returned
    to the sender unchanged. A copy goes to --mirror fire-and-forget: queued and sent in the
    background with the seed's timeout, so a slow or dead dev never delays or fails production.
    Dev gets the x-hub-signature-256 and content-type headers plus x-replicated-from: production and
    x-replicated-at. REPLICATE_WEBHOOKS_TO_DEV, DEV_WEBHOOK_URL and DEV_WEBHOOK_TIMEOUT work as in the
    seed. A URL with a path receives every request at that path; a bare http://host:port receives
    each request at its own path. Runs until SIGTERM or Ctrl-C.
    """
    from dbdeck import log as log_module

    from .model import check_url, parse_listen
    from .relay import Mirror, RelayServer, Target

    settings = app.config.section("webhook_relay")
    updates = {k: v for k, v in (("listen", listen), ("primary", primary), ("mirror", mirror),
                                 ("mirror_timeout_ms", mirror_timeout_ms)) if v is not None}
    if no_mirror:
        updates["mirror_enabled"] = False
    settings = settings.model_copy(update=updates)
    try:
        address = parse_listen(settings.listen)
        check_url(settings.primary)
        check_url(settings.mirror)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not settings.primary:
        raise UsageError("no primary URL: give --primary URL or webhook_relay.primary in the config")
    mirroring = settings.mirror_enabled and settings.mirror
    plan = (f"webhook-relay on http://{address[0]}:{address[1]} -> primary {settings.primary}"
            + (f"; mirroring to {settings.mirror} (timeout {settings.mirror_timeout_ms} ms)" if mirroring
               else "; not mirroring" + ("" if settings.mirror_enabled else " (REPLICATE_WEBHOOKS_TO_DEV=false)")
               + ("" if settings.mirror else " (no DEV_WEBHOOK_URL)")))
    if app.dry_run:
        app.runner.say(f"would serve: {plan}")
        return
    log_module.setup(max(app.verbosity, 1))  # a service: its INFO lines are its output (docker/journal logs)
    log_dir = settings.log_dir or app.config.core.log_dir
    if log_dir:
        log_module.add_daily_file(log_dir, "webhook-relay")
    mirror_sender = None
    if mirroring:
        mirror_sender = Mirror(Target(settings.mirror), settings.mirror_timeout_ms, settings.mirror_queue,
                               settings.mirror_workers)
        mirror_sender.start()
    try:
        server = RelayServer(address, Target(settings.primary), mirror_sender, settings)
    except OSError as exc:
        raise UsageError(f"cannot listen on {settings.listen}: {exc.strerror or exc}") from None
    host, port = server.server_address[:2]
    log.info("%s; health at %s", plan.replace(f"{address[0]}:{address[1]}", f"{host}:{port}"), settings.health_path)

    def stop(signum, _frame):
        log.info("webhook-relay stopping (signal %d)", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    lock = app.lock(f"webhook-relay.{port}").acquire()  # for `dbdeck status`: alive while it holds this
    if app.format == "json":  # once a SIGTERM is a clean stop
        app.announce("webhook-relay", listening=f"http://{host}:{port}", primary=settings.primary,
                     mirror=settings.mirror if mirroring else None, health=settings.health_path)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        lock.release()
        if mirror_sender:
            mirror_sender.drain(settings.mirror_timeout_ms / 1000 + 1)
