"""The contract between the dbdeck core and its plugins (built-in and third-party).

A plugin is a module or object with functions decorated by ``dbdeck.hookspecs.hookimpl``.
Built-in plugins are listed in DEFAULT_PLUGINS; others are found through the ``dbdeck.plugins``
entry-point group. Keep plugin modules light at import time: heavy imports (psycopg, pymysql,
the plugin's own internals) belong inside command bodies, so ``dbdeck --help`` stays fast.
"""

import pluggy

PROJECT = "dbdeck"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

DEFAULT_PLUGINS = (
    "dbdeck.plugins.deploy",
    "dbdeck.plugins.local_sync",
    "dbdeck.plugins.notify",
    "dbdeck.plugins.replication",
    "dbdeck.plugins.sandbox",
    "dbdeck.plugins.schedule",
    "dbdeck.plugins.sync_databases",
    "dbdeck.plugins.sync_prod_to_dev",
    "dbdeck.plugins.webhook_relay",
)


@hookspec
def register_commands(cli):
    """Add this plugin's click commands or groups to ``cli`` (the root ``dbdeck`` group).

    Each command becomes ``dbdeck <name>`` and, through ``main_for(name)``, its own executable.
    The core adds the global options (--config, --dry-run, -v, --format) to every command.
    """


@hookspec
def config_section():
    """Return a ``dbdeck.config.ConfigSection`` (or a list of them) for this plugin's YAML section.

    The section's pydantic model gives defaults and validation (unknown keys are errors);
    its ``env`` mapping lets the seeds' environment variables override keys in it. Give the model as
    ``"package.module:Class"`` to have it imported only when a command reads the section (every command
    start calls this hook for every plugin).
    """


@hookspec
def scheduled_jobs(config):
    """Return default jobs this plugin wants scheduled, as a list of dicts
    (``name``, ``command`` argv list, ``every`` interval or ``cron`` expression), given the loaded config.
    """


@hookspec
def status_report(app):
    """Return a list of ``dbdeck.status.Item`` rows for `dbdeck status`: this plugin's scheduled jobs,
    services (alive?), verdicts. Must be quick and should not raise: an unreachable server is a row whose
    state is ``failing``, with the reason in ``detail``. (If it raises anyway, `dbdeck status` shows one
    failing row naming the plugin and its error, and the other plugins' rows.)
    """


@hookspec
def history_entries(app):
    """Return events for `dbdeck history` that this plugin knows from elsewhere than the notify hook (the
    replication plugin: Patroni's timeline history), as dicts with ``at`` (ISO time), ``ts`` (epoch),
    ``kind``, ``severity``, ``message`` and ``details``. Must not raise: return what is reachable.
    """


@hookspec
def notify(event, config):
    """Deliver a ``dbdeck.events.Event`` (failover happened, deploy rolled back, sync failed...).

    Called for every event (never in a dry run); ``config`` is the loaded configuration (None when it
    could not be loaded). A plugin sends mail, a webhook or a chat message and must not raise.
    The built-in ``notify`` plugin posts to ``notify.webhook_url`` and/or runs ``notify.command``.
    """


@hookspec
def row_transformers():
    """Return a mapping of rule name -> callable(value, **options) used to anonymise rows
    (sync-prod-to-dev's per-column rules). Later plugins may add rules; a clash is an error.
    """
