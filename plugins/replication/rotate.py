"""rotate-replication-password: a new secret for the replication role, put everywhere it is used and
proven in use, or the old one put back everywhere.

Where the secret lives: the password file, the role's SCRAM verifier on the primary (replicated to the
standbys), each standby's primary_conninfo, and Barman's pgpass file. A standby's WAL receiver restarts
with the new conninfo on reload (PostgreSQL 13+), so nothing is rebuilt or restarted.
"""

import logging
import secrets as token
import time

from psycopg import sql

from dbdeck import faults, secrets
from dbdeck.errors import DbdeckError, Refused
from dbdeck.state import write_atomic

from .setup import password_file, read_password
from .standby import follow

log = logging.getLogger("dbdeck.replication")

_RECEIVER_PID = "SELECT pid FROM pg_stat_wal_receiver WHERE status = 'streaming'"


def rotate(pair):
    snapshot = pair.probe()
    if len(snapshot.primaries) != 1:
        raise Refused("rotation needs exactly one reachable primary: " +
                      ", ".join(f"{n.name}: {n.role}" for n in snapshot.nodes))
    primary = pair.node(snapshot.primaries[0].name)
    standbys = [pair.node(n.name) for n in snapshot.nodes if n.name != primary.name]
    not_streaming = [n.name for n in standbys if not pair.is_streaming(n, primary)]
    if not_streaming:
        raise Refused(f"{', '.join(not_streaming)} is not streaming from {primary.name}: fix replication first "
                      f"(a rotation proves itself by the standbys reconnecting)")
    old = read_password(pair)
    new = token.token_urlsafe(24)
    secrets.register(new)
    user = pair.settings.replication_user
    barman = _barman(pair)
    if pair.runner.dry_run:
        pair.say(f"would write a new password to {password_file(pair)} (mode 0600)")
        pair.say(f"would execute on {primary.name}: ALTER ROLE {user} PASSWORD '***' (SCRAM verifier only)")
        for node in standbys:
            pair.say(f"would rewrite {node.name}'s primary_conninfo and reload it")
        if barman:
            pair.say(f"would rewrite Barman's pgpass ({barman.passfile}) and restart its WAL receiver")
        return {"dry_run": True, "standbys": [n.name for n in standbys]}

    receivers_before = {n.name: _receiver_pid(n) for n in standbys}
    started = time.time()
    try:
        _put_everywhere(pair, primary, standbys, barman, new, "new")
        _prove(pair, primary, standbys, barman, receivers_before, started)
    except BaseException as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        pair.say(f"rotation failed ({reason}): putting the old password back everywhere", logging.ERROR)
        _put_everywhere(pair, primary, standbys, barman, old, "old")
        raise
    pair.say(f"{user}: new password in use; standbys {', '.join(n.name for n in standbys)} stream with it"
             + (", Barman's receiver too" if barman else ""))
    return {"streaming": [n.name for n in standbys], "barman": bool(barman), "password_file": str(password_file(pair))}


def _barman(pair):
    if pair.settings.backup is None:
        return None
    from .barman import Barman

    barman = Barman(pair)
    return barman if barman.configured else None


def _put_everywhere(pair, primary, standbys, barman, password, which):
    user = pair.settings.replication_user
    write_atomic(password_file(pair), password + "\n", mode=0o600)
    with primary.connect() as conn, primary.endpoint.driver_errors("ALTER ROLE"):
        verifier = conn.pgconn.encrypt_password(password.encode(), user.encode(), b"scram-sha-256").decode()
        secrets.register(verifier)
        conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(user), sql.Literal(verifier)))
    pair.say(f"{user}: {which} password set on {primary.name} (SCRAM verifier only) and in {password_file(pair)}")
    if which == "new":
        faults.point("rotate.role-altered")
    for node in standbys:
        follow(pair, node, primary)
        with node.connect() as conn, node.endpoint.driver_errors("reload"):
            conn.execute("SELECT pg_reload_conf()")
    if which == "new":
        faults.point("rotate.standbys-changed")
    if barman is not None:
        barman.write_password(primary, password)
        barman.stop_receiver()
        barman.start_receiver()


def _receiver_pid(node):
    try:
        with node.connect(timeout=3) as conn:
            row = conn.execute(_RECEIVER_PID).fetchone()
            return row[0] if row else None
    except DbdeckError:
        return None


def _prove(pair, primary, standbys, barman, receivers_before, started):
    """Each standby's WAL receiver is a new one (it reconnected, so with the new password) and streams;
    Barman's receiver connected after the change."""
    for node in standbys:
        def reconnected(node=node):
            pid = _receiver_pid(node)
            return pid is not None and pid != receivers_before[node.name] and pair.is_streaming(node, primary)

        pair.wait_for(reconnected, f"{node.name} to reconnect with the new password", timeout=60)
        pair.say(f"{node.name}: streaming again with the new password")
    if barman is not None:
        def barman_connected():
            with primary.connect(timeout=3) as conn:
                row = conn.execute("SELECT extract(epoch FROM backend_start) FROM pg_stat_replication "
                                   "WHERE application_name = 'barman_receive_wal' AND state = 'streaming'").fetchone()
            return row is not None and float(row[0]) >= started - 1

        pair.wait_for(barman_connected, "Barman's WAL receiver to reconnect with the new password", timeout=90)
        pair.say("Barman's WAL receiver: streaming again with the new password")
