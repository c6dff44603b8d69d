"""rotate-replication-password: a new secret for the replication role, put everywhere it is used and
proven in use, or the old one put back everywhere.

Where the secret lives: the password file, the role's SCRAM verifier on the primary (replicated to the
standbys), each standby's primary_conninfo, and Barman's pgpass file. A standby's WAL receiver restarts
with the new conninfo on reload (PostgreSQL 13+), so nothing is rebuilt or restarted.

A rotation is journalled (<state_dir>/replication/rotation.json, no secret in it) from its first change
to its last: a run killed in between leaves the journal, and the next rotation first puts the password
file's secret (the new one, or the old one if the kill came before it was written) everywhere, proves it
in use, and only then rotates again. check-replication reports the journal, and any standby or Barman
whose configured secret no longer matches the role's.
"""

import base64
import hashlib
import hmac
import logging
import os
import re
import secrets as token
import time

from psycopg import sql

from dbdeck import faults, output, secrets
from dbdeck.errors import DbdeckError, Refused
from dbdeck.state import write_atomic

from .setup import password_file, read_password
from .standby import follow

log = logging.getLogger("dbdeck.replication")

_RECEIVER_PID = "SELECT pid FROM pg_stat_wal_receiver WHERE status = 'streaming'"


def interrupted_rotation(pair):
    """When an unfinished rotation started (its journal), or None."""
    journal = pair.record("rotation")
    return journal.read().get("started_at", "?") if journal.path.exists() else None


def _begin(pair):
    pair.record("rotation").write({"started_at": output.timestamp(), "pid": os.getpid()})


def _end(pair):
    pair.record("rotation").path.unlink(missing_ok=True)


def _finish_interrupted(pair, primary, standbys, barman):
    """An earlier rotation was killed half-way: the password file holds whichever secret it wrote last; put
    that one everywhere (each step is idempotent) and prove it in use before anything else."""
    started = interrupted_rotation(pair)
    if started is None:
        return
    pair.say(f"a rotation started at {started} did not finish: putting the password in {password_file(pair)} "
             f"everywhere first", logging.WARNING)
    if pair.runner.dry_run:
        pair.say("would put it on the role, in each standby's primary_conninfo and Barman's pgpass, then prove it")
        return
    current = read_password(pair)
    receivers_before = {n.name: _receiver_pid(n) for n in standbys}
    began = time.time()
    _put_everywhere(pair, primary, standbys, barman, current, "current")
    # a standby whose conninfo already had this secret keeps its connection: end it on the primary's side,
    # so that its reconnection proves the secret
    with primary.connect() as conn, primary.endpoint.driver_errors("reconnecting the standbys"):
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_replication WHERE application_name = ANY(%s)",
                     ([n.name for n in standbys],))
    _prove(pair, primary, standbys, barman, receivers_before, began)
    _end(pair)
    pair.say("the interrupted rotation is finished: one password everywhere")


def rotate(pair):
    snapshot = pair.probe()
    if len(snapshot.primaries) != 1:
        raise Refused("rotation needs exactly one reachable primary: " +
                      ", ".join(f"{n.name}: {n.role}" for n in snapshot.nodes))
    primary = pair.node(snapshot.primaries[0].name)
    standbys = [pair.node(n.name) for n in snapshot.nodes if n.name != primary.name]
    barman = _barman(pair)
    _finish_interrupted(pair, primary, standbys, barman)
    not_streaming = [n.name for n in standbys if not pair.is_streaming(n, primary)]
    if not_streaming:
        raise Refused(f"{', '.join(not_streaming)} is not streaming from {primary.name}: fix replication first "
                      f"(a rotation proves itself by the standbys reconnecting)")
    old = read_password(pair)
    new = token.token_urlsafe(24)
    secrets.register(new)
    user = pair.settings.replication_user
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
    _begin(pair)
    try:
        _put_everywhere(pair, primary, standbys, barman, new, "new")
        _prove(pair, primary, standbys, barman, receivers_before, started)
    except BaseException as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        pair.say(f"rotation failed ({reason}): putting the old password back everywhere", logging.ERROR)
        _put_everywhere(pair, primary, standbys, barman, old, "old")
        _end(pair)
        raise
    _end(pair)
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


def password_matches(password, verifier, user):
    """Whether password logs in against a role's stored verifier (SCRAM-SHA-256 or md5); None when the
    verifier is of neither kind."""
    scram = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$]+)\$([^:]+):(.+)", verifier or "")
    if scram:
        iterations, salt, stored_key = int(scram[1]), base64.b64decode(scram[2]), base64.b64decode(scram[3])
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
        client_key = hmac.new(salted, b"Client Key", "sha256").digest()
        return hmac.compare_digest(hashlib.sha256(client_key).digest(), stored_key)
    if re.fullmatch(r"md5[0-9a-f]{32}", verifier or ""):
        return hmac.compare_digest("md5" + hashlib.md5((password + user).encode()).hexdigest(), verifier)
    return None


def secret_problems(pair, snapshot):
    """[(level, text)]: an unfinished rotation, and each standby (or Barman) whose configured replication
    password no longer matches the role's, so that its next reconnection will fail while it streams now."""
    from psycopg.conninfo import conninfo_to_dict

    from .cluster import WARNING
    from .pgpass import password_in, pgpass_password

    problems = []
    started = interrupted_rotation(pair)
    if started:
        problems.append((WARNING, f"a rotate-replication-password started at {started} did not finish: run it "
                                  f"again (it finishes that one first)"))
    if len(snapshot.primaries) != 1:
        return problems
    user = pair.settings.replication_user
    primary = pair.node(snapshot.primaries[0].name)
    try:
        with primary.connect(timeout=5) as conn:
            row = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (user,)).fetchone()
    except Exception:  # not a superuser, or the primary just went away: nothing to compare against
        return problems
    verifier = row[0] if row else None
    configured = []
    for state in snapshot.nodes:
        if not (state.reachable and state.in_recovery):
            continue
        try:
            with pair.node(state.name).connect(timeout=5) as conn:
                row = conn.execute("SELECT setting FROM pg_settings WHERE name = 'primary_conninfo'").fetchone()
                options = conninfo_to_dict(row[0]) if row and row[0] else {}
                password = options.get("password")
                if password is None and options.get("passfile"):
                    # pg_read_file takes a path relative to the data directory, as the WAL receiver does
                    text = conn.execute("SELECT pg_read_file(%s)", (options["passfile"],)).fetchone()[0]
                    password = password_in(text, user)
        except Exception:
            continue
        if options.get("password") is not None:
            secrets.register(options["password"])
            problems.append((WARNING, f"{state.name}: the replication password is in its primary_conninfo (so in "
                                      f"its server log on reload and in its base backups): run "
                                      f"rotate-replication-password, which moves it into a passfile"))
        if password is not None:
            configured.append((state.name, password))
    barman = _barman(pair)
    if barman is not None:
        password = pgpass_password(barman.passfile, user)
        if password is not None:
            configured.append(("Barman's WAL receiver", password))
    for who, password in configured:
        secrets.register(password)
        if password_matches(password, verifier, user) is False:
            problems.append((WARNING, f"{who}: the replication password it is configured with no longer logs in "
                                      f"as {user}; it streams now, but its next reconnection will fail: run "
                                      f"rotate-replication-password (it puts one password everywhere)"))
    return problems
