"""switchover: a planned role swap that loses no acknowledged commit.

The old primary is shut down cleanly first; its shutdown checkpoint is the last WAL it will ever
write, and the standby is promoted only once it has replayed past it. If that does not happen in
time, the old primary is started again unchanged and nothing was lost.
"""

import logging

from dbdeck import faults
from dbdeck.errors import DbdeckError, Refused
from dbdeck.events import Event

from . import handover, synchronous
from .setup import read_password
from .standby import checkpoint_lsn, drop_own_slot, ensure_slot, follow, rejoin, stop_node


def precheck(pair, max_lag_bytes):
    """(primary, standby) when a switchover can start; Refused otherwise. Runs in a dry run too."""
    snapshot = pair.probe()
    if len(snapshot.primaries) != 1:
        raise Refused("switchover needs exactly one primary: " + ", ".join(f"{n.name}: {n.role}"
                                                                           for n in snapshot.nodes))
    primary_state = snapshot.primary
    streaming = [s for s in snapshot.standbys if s.state == "streaming" and s.receiver_status == "streaming"]
    if not streaming:
        down = [f"{s.name}: {snapshot.node(s.name).error or s.receiver_status or 'not streaming'}"
                for s in snapshot.standbys]
        raise Refused(f"no standby is streaming from {primary_state.name} ({'; '.join(down) or 'none'}); "
                      f"the primary keeps running")
    if len(streaming) > 1:
        raise Refused("several standbys stream; this pair-oriented switchover needs exactly one")
    standby_entry = streaming[0]
    if standby_entry.lag_bytes is not None and standby_entry.lag_bytes > max_lag_bytes:
        raise Refused(f"{standby_entry.name} lags {standby_entry.lag_bytes} bytes (over {max_lag_bytes}); "
                      f"wait until it catches up")
    if not standby_entry.slot_name:
        raise Refused(f"{standby_entry.name} does not stream through a replication slot; run rebuild-replica")
    primary, standby = pair.node(primary_state.name), pair.node(standby_entry.name)
    with primary.connect() as conn, primary.endpoint.driver_errors("pre-check"):
        hints, checksums = conn.execute("SELECT current_setting('wal_log_hints'), "
                                        "current_setting('data_checksums')").fetchone()
    if hints != "on" and checksums != "on":
        raise Refused(f"{primary.name} has neither wal_log_hints nor data checksums: pg_rewind could not bring "
                      f"it back if needed; run setup-master --apply-settings and restart it first")
    read_password(pair)
    pair.say(f"pre-checks passed: {primary.name} primary, {standby.name} streaming through slot "
             f"{standby_entry.slot_name}, lag {standby_entry.lag_bytes} bytes")
    return primary, standby


def _replayed_past(standby, lsn):
    try:
        with standby.connect(timeout=3) as conn:
            return conn.execute("SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), %s::pg_lsn) > 0",
                                (lsn,)).fetchone()[0]
    except Exception:
        return False


def switchover(pair, max_lag_bytes, timeout):
    primary, standby = precheck(pair, max_lag_bytes)
    steps = [f"block new writes on {primary.name} (default_transaction_read_only), CHECKPOINT",
             f"clean (fast) shutdown of {primary.name}; read its shutdown checkpoint LSN",
             f"wait up to {timeout}s until {standby.name} replayed past it (else restart {primary.name}, abort)",
             f"{primary.name}: standby.signal + primary_conninfo -> {standby.name} (from now on it can only "
             f"start as a standby)",
             f"promote {standby.name}; wait until it accepts writes",
             f"start {primary.name}; verify it streams from {standby.name} (pg_rewind, else a base backup, if it "
             f"cannot follow)",
             f"synchronous_standby_names on {standby.name}: "
             f"'{synchronous.wanted(pair) if synchronous.wanted(pair) is not None else 'as it is'}'"]
    if pair.settings.haproxy is not None and pair.settings.manager == "native":
        steps.insert(1, f"wait until HAProxy's write port no longer routes to {primary.name}")
        steps.append(f"wait until HAProxy's write port routes to {standby.name}, then return")
    if pair.runner.dry_run:
        pair.say("plan:\n  " + "\n  ".join(f"{i}. {s}" for i, s in enumerate(steps, 1)))
        return primary, standby

    with primary.connect() as conn, primary.endpoint.driver_errors("blocking writes"):
        synchronous.remember(pair, conn.execute("SHOW synchronous_standby_names").fetchone()[0])
        conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        conn.execute("SELECT pg_reload_conf()")
        conn.execute("CHECKPOINT")
    pair.say(f"{primary.name}: new transactions are read-only; checkpoint done")
    handover.wait_unrouted(pair, primary)
    stop_node(pair, primary, "fast")
    state, lsn = checkpoint_lsn(pair, primary)
    pair.say(f"{primary.name} stopped ({state}); shutdown checkpoint at {lsn}")
    if state != "shut down":
        _restart_old_primary(pair, primary)
        raise DbdeckError(f"{primary.name} did not shut down cleanly ({state}); switchover aborted, it runs again")
    try:
        pair.wait_for(lambda: _replayed_past(standby, lsn), f"{standby.name} to replay past {lsn}", timeout=timeout)
    except DbdeckError as exc:
        _restart_old_primary(pair, primary)
        raise DbdeckError(f"{exc}; switchover aborted: {primary.name} is the primary again") from None
    pair.say(f"{standby.name} replayed past {lsn}: nothing acknowledged is missing")

    # fenced before the promotion: killed from here on, the old primary can only start as a standby
    follow(pair, primary, standby)
    drop_own_slot(pair, primary)
    faults.point("switchover.old-fenced")
    ensure_slot(pair, standby)  # before the promotion, so its checkpoint cannot recycle what a rejoin needs
    try:
        with standby.connect() as conn, standby.endpoint.driver_errors("pg_promote"):
            if not conn.execute("SELECT pg_promote(true, %s)", (pair.settings.wait_timeout,)).fetchone()[0]:
                raise DbdeckError(f"pg_promote() on {standby.name} did not finish")
    except DbdeckError as exc:
        if pair.accepts_writes(standby):
            raise DbdeckError(f"{exc}; {standby.name} accepts writes anyway, {primary.name} stays a stopped "
                              f"standby-to-be: run rebuild-replica --rejoin --node {primary.name}") from None
        primary.driver.shell('rm -f "$1/standby.signal"', primary.driver.data_dir, offline=True)
        _restart_old_primary(pair, primary)
        raise DbdeckError(f"{exc}; switchover aborted: {primary.name} is the primary again") from None
    pair.wait_for(lambda: pair.accepts_writes(standby), f"{standby.name} to accept writes")
    pair.say(f"{standby.name} is the primary")
    faults.point("switchover.promoted")

    primary.driver.start()
    try:
        pair.wait_for(lambda: pair.is_streaming(primary, standby), f"{primary.name} to stream from {standby.name}",
                      timeout=min(30, pair.settings.wait_timeout))
    except DbdeckError:
        pair.say(f"{primary.name} does not stream from {standby.name}; rejoining it", logging.WARNING)
        rejoin(pair, primary, standby)
    synchronous.standby_streams(pair, standby)
    handover.wait_routed(pair, standby)
    pair.say(f"switchover done: {standby.name} is the primary, {primary.name} streams from it")
    pair.app.notify(Event("switchover.done", f"switchover: {standby.name} primary, {primary.name} standby",
                          details={"primary": standby.name, "standby": primary.name}))
    from .backup import after_role_change

    after_role_change(pair, standby)
    return primary, standby


def _restart_old_primary(pair, primary):
    pair.say(f"starting {primary.name} again and allowing writes", logging.WARNING)
    primary.driver.start()
    pair.wait_for(lambda: pair.accepts_writes(primary) or _reset_read_only(primary), f"{primary.name} to answer")
    _reset_read_only(primary)
    handover.wait_routed(pair, primary)


def _reset_read_only(primary):
    try:
        with primary.connect(timeout=3) as conn:
            conn.execute("ALTER SYSTEM RESET default_transaction_read_only")
            conn.execute("SELECT pg_reload_conf()")
        return True
    except Exception:
        return False
