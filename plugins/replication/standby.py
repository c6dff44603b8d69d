"""Turning a stopped node into a standby of another: follow (standby.signal + primary_conninfo), pg_rewind,
and fencing (a node that can only ever come back read-only).

Everything here edits a *stopped* node's data directory through its driver's offline shell.
"""

import logging

from dbdeck.errors import DbdeckError

from .setup import ensure_slot as ensure_slot_on_connection, read_password

# $1 data directory; stdin: the primary_conninfo/primary_slot_name lines. The password is in the
# conninfo, so the file stays private. default_transaction_read_only is dropped: switchover sets it
# to block writes on the old primary, and it must not follow the node into a later promotion.
_FOLLOW = r'''set -eu
data=$1; conf="$data/postgresql.auto.conf"
touch "$conf"
grep -vE "^[[:space:]]*(primary_conninfo|primary_slot_name|default_transaction_read_only)[[:space:]]*=" \
    "$conf" > "$conf.dbdeck" || true
cat >> "$conf.dbdeck"
chmod 600 "$conf.dbdeck"
mv "$conf.dbdeck" "$conf"
touch "$data/standby.signal"
'''


def _quote_conninfo(value):
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _quote_setting(value):
    return "'" + str(value).replace("'", "''") + "'"


def follow(pair, node, primary):
    """Make the stopped `node` start as a standby streaming from `primary` (through the slot)."""
    password = read_password(pair)
    host, port = primary.replication_address
    conninfo = " ".join(f"{k}={_quote_conninfo(v)}" for k, v in (
        ("host", host), ("port", port), ("user", pair.settings.replication_user), ("password", password),
        ("application_name", node.name)))
    lines = (f"primary_conninfo = {_quote_setting(conninfo)}\n"
             f"primary_slot_name = {_quote_setting(pair.settings.slot)}\n")
    pair.say(f"{node.name}: standby.signal + primary_conninfo -> {primary.name} ({host}:{port}), "
             f"slot {pair.settings.slot}")
    node.driver.shell(_FOLLOW, node.driver.data_dir, stdin=lines, offline=True)


def ensure_slot(pair, primary):
    with primary.connect() as conn, primary.endpoint.driver_errors("slot"):
        return ensure_slot_on_connection(pair, conn, primary.name)


def stop_node(pair, node, mode="fast"):
    try:
        node.driver.stop(mode, timeout=60)
    except DbdeckError as exc:
        pair.say(f"{node.name}: {mode} shutdown failed ({exc}); stopping immediately", logging.WARNING)
        node.driver.stop("immediate", timeout=30)
    if not pair.runner.dry_run:
        pair.wait_for(lambda: not node.driver.is_running(), f"{node.name} to stop", timeout=60)


def fence(pair, node, new_primary):
    """Make `node` unable to come back as a writable primary: stop it, keep its container from restarting
    itself, and leave standby.signal in its data directory (started again, it can only be a standby)."""
    pair.say(f"fencing {node.name}: stop it and make it restart only as a standby of {new_primary.name}")
    stop_node(pair, node, "immediate")
    if node.config.driver == "docker":
        pair.runner.run(["docker", "update", "--restart=no", node.driver.container], check=False)
    follow(pair, node, new_primary)


def _saved_config(pair, node):
    """The node's own config files, read before pg_rewind copies the source's over them."""
    saved = {}
    for name in pair.settings.keep_config_files:
        result = node.driver.shell('cat "$1/$2" 2>/dev/null || true', node.driver.data_dir, name, offline=True,
                                   read_only=True)
        if result.stdout:
            saved[name] = result.stdout
    return saved


# $1 data directory; stdin: the node's own settings. They go to dbdeck-node.conf, included last from
# postgresql.conf: a copy (pg_basebackup, pg_rewind) brings the primary's files, and the primary's own
# node settings (its port...) must not follow them to this node.
_APPLY_NODE_SETTINGS = r'''set -eu
data=$1; include="include_if_exists = 'dbdeck-node.conf'"
cat > "$data/dbdeck-node.conf"
if [ -f "$data/postgresql.conf" ]; then
    grep -vxF "$include" "$data/postgresql.conf" > "$data/postgresql.conf.dbdeck" || true
    printf '%s\n' "$include" >> "$data/postgresql.conf.dbdeck"
    mv "$data/postgresql.conf.dbdeck" "$data/postgresql.conf"
else
    cat "$data/dbdeck-node.conf" >> "$data/postgresql.auto.conf"
fi
'''


def setting_line(key, value):
    if isinstance(value, bool):
        text = "on" if value else "off"
    elif isinstance(value, (int, float)):
        text = str(value)
    else:
        text = "'" + str(value).replace("'", "''") + "'"
    return f"{key} = {text}\n"


def apply_node_settings(node):
    """Write the node's `settings:` into its stopped data directory."""
    text = "".join(setting_line(k, v) for k, v in node.config.settings.items())
    node.driver.shell(_APPLY_NODE_SETTINGS, node.driver.data_dir, stdin=text, offline=True)


def rewind(pair, node, source):
    """pg_rewind the stopped `node` onto `source` (crash recovery first if it was not shut down cleanly),
    then make it follow `source`. Raises when pg_rewind cannot do it (the caller falls back to a base backup)."""
    saved = _saved_config(pair, node)
    admin = source.endpoint
    host, port = source.replication_address
    conninfo = f"host={host} port={port} user={admin.user or 'postgres'} dbname={admin.database or 'postgres'}"
    env = {"PGPASSWORD": admin.password} if admin.password else {}
    pair.say(f"pg_rewind {node.name} onto {source.name}")
    # a fresh primary writes its new timeline to pg_control only at the end-of-recovery checkpoint, which
    # promotion no longer waits for; without it pg_rewind sees one timeline and says "no rewind required"
    if not pair.runner.dry_run:
        with source.connect() as conn, source.endpoint.driver_errors("CHECKPOINT"):
            conn.execute("CHECKPOINT")
    # pg_rewind finishes an unclean shutdown with a single-user server, which refuses to run with
    # standby.signal present (fencing left it there); follow() writes it again right after
    node.driver.shell('rm -f "$1/standby.signal" "$1/recovery.signal"', node.driver.data_dir, offline=True)
    node.driver.shell('exec "$@"', node.driver.tool("pg_rewind"), "-D", node.driver.data_dir,
                      f"--source-server={conninfo}", "--progress", env=env, offline=True, timeout=6 * 3600)
    for name, text in saved.items():
        node.driver.shell('cat > "$1/$2"', node.driver.data_dir, name, stdin=text, offline=True)
    apply_node_settings(node)
    follow(pair, node, source)


def rejoin(pair, node, primary):
    """Bring `node` back as a standby of `primary`: pg_rewind when possible, else a fresh base backup."""
    ensure_slot(pair, primary)
    stop_node(pair, node)
    try:
        rewind(pair, node, primary)
        node.driver.start()
        if pair.runner.dry_run:
            return "rewind"
        pair.wait_for(lambda: pair.is_streaming(node, primary), f"{node.name} to stream from {primary.name}",
                      timeout=min(60, pair.settings.wait_timeout))
        pair.say(f"{node.name} rejoined as a standby of {primary.name} (pg_rewind)")
        return "rewind"
    except DbdeckError as exc:
        pair.say(f"pg_rewind path failed ({str(exc).splitlines()[0]}); falling back to a fresh base backup",
                 logging.WARNING)
    from .rebuild import rebuild_replica  # rebuild uses this module's helpers

    rebuild_replica(pair, node.name)
    return "basebackup"
