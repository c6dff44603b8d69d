"""synchronous_standby_names across role changes.

Wanted value: `replication.synchronous_standby_names` from the YAML, else the last non-empty value dbdeck
saw on a primary (remembered in the state dir when it had to clear it). Every command that changes roles
ends in one of two calls:
  primary_alone(primary)     no standby yet: commits must not wait for one ('' until a standby streams);
  standby_streams(primary)   a standby streams again: the wanted value applies again.
so whatever node is primary runs synchronously once a standby streams, after a switchover, a failover, a
rejoin or a rebuild alike (copies of postgresql.auto.conf between nodes no longer decide it).
"""

import logging

from psycopg import sql

log = logging.getLogger("dbdeck.replication")


def remembered(pair):
    return pair.record("synchronous_standby_names").read().get("value")


def remember(pair, value):
    if pair.settings.synchronous_standby_names is not None or not value or pair.runner.dry_run:
        return
    pair.record("synchronous_standby_names").write({"value": value})


def wanted(pair):
    configured = pair.settings.synchronous_standby_names
    return configured if configured is not None else remembered(pair)


def current(node, timeout=5):
    with node.connect(timeout=timeout) as conn, node.endpoint.driver_errors("SHOW synchronous_standby_names"):
        return conn.execute("SHOW synchronous_standby_names").fetchone()[0]


def _set(pair, node, value, why):
    if pair.runner.dry_run:
        pair.say(f"would set synchronous_standby_names = '{value}' on {node.name} ({why})")
        return
    with node.connect() as conn, node.endpoint.driver_errors("synchronous_standby_names"):
        conn.execute(sql.SQL("ALTER SYSTEM SET synchronous_standby_names = {}").format(sql.Literal(value)))
        conn.execute("SELECT pg_reload_conf()")
    pair.say(f"{node.name}: synchronous_standby_names = '{value}' ({why})")


def primary_alone(pair, primary):
    """A primary without a standby: commits must not block on one (remembering what it had). Called on
    a standby about to be promoted too (ALTER SYSTEM works there), so its first commit does not wait."""
    try:
        value = current(primary)
        if not value:
            return
        remember(pair, value)
        _set(pair, primary, "", "no standby yet: commits do not wait until one rejoins")
    except Exception as exc:  # the promotion stands; say what is left to do
        pair.say(f"{primary.name}: could not clear synchronous_standby_names: {exc}", logging.ERROR)


def standby_streams(pair, primary):
    """A standby streams from primary: the wanted synchronous setting applies (again)."""
    value = wanted(pair)
    if value is None:
        return
    try:
        if current(primary) != value:
            _set(pair, primary, value, "a standby streams: commits wait for it again" if value
                 else "as configured")
    except Exception as exc:
        pair.say(f"{primary.name}: could not set synchronous_standby_names = '{value}': {exc}", logging.ERROR)
