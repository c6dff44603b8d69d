"""setup-master: prepare the primary for streaming replication, idempotently.

The replication role's password never travels in clear text to the server: dbdeck computes the
SCRAM-SHA-256 verifier client-side (libpq's PQencryptPasswordConn), so neither the server log
(log_statement) nor pg_stat_activity ever holds it.
"""

import base64
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets as token
from dataclasses import dataclass
from pathlib import Path

from psycopg import sql

from dbdeck import secrets
from dbdeck.errors import DbdeckError, Refused
from dbdeck.state import write_atomic

_MIN_SENDERS = 2  # the standby's stream plus pg_basebackup's WAL stream during a rebuild


@dataclass
class SettingCheck:
    name: str
    current: str
    wanted: str
    ok: bool
    blocking: bool      # replication cannot work until it is fixed
    needs_restart: bool
    why: str


def password_file(pair):
    configured = pair.settings.replication_password_file
    if configured:
        return Path(configured)
    return pair.app.config.state_dir / "replication" / f"{pair.settings.replication_user}.password"


def read_password(pair, required=True):
    return read_secret(password_file(pair), "replication password", required,
                       "run setup-master first (it generates one) or set replication.replication_password_file")


def read_secret(path, what, required=True, hint=""):
    """A secret kept alone in a file (the first line), registered so that it is masked everywhere."""
    try:
        value = Path(path).read_text().strip()
    except FileNotFoundError:
        if required:
            raise DbdeckError(f"no {what} in {path}" + (f": {hint}" if hint else "")) from None
        return None
    except OSError as exc:
        raise DbdeckError(f"cannot read the {what} file {path}: {exc.strerror}") from None
    if not value:
        raise DbdeckError(f"the {what} file {path} is empty")
    if Path(path).stat().st_mode & 0o077:
        logging.getLogger("dbdeck.replication").warning(
            "%s is readable by other users (mode %o); chmod 600 it", path, Path(path).stat().st_mode & 0o777)
    secrets.register(value)
    return value


def ensure_secret(pair, path, what):
    """The secret in path, generated (token_urlsafe, mode 0600) when the file does not exist yet; a dry
    run only says so and returns a placeholder."""
    value = read_secret(path, what, required=False)
    if value is not None:
        return value
    value = new_secret()
    store_secret(pair, path, value, what)
    return value


def new_secret():
    value = token.token_urlsafe(24)
    secrets.register(value)
    return value


def store_secret(pair, path, value, what):
    if pair.runner.dry_run:
        pair.say(f"would generate the {what} and store it in {path} (mode 0600)")
        return
    os.makedirs(Path(path).parent, mode=0o700, exist_ok=True)
    write_atomic(path, value + "\n", mode=0o600)
    pair.say(f"generated the {what}: stored in {path} (mode 0600)")


def scram_matches(verifier, password):
    """Whether a stored SCRAM-SHA-256 verifier (pg_authid.rolpassword) belongs to password."""
    try:
        method, rest = verifier.split("$", 1)
        iterations_salt, keys = rest.split("$", 1)
        iterations, salt = iterations_salt.split(":", 1)
        stored_key, _server_key = keys.split(":", 1)
    except (AttributeError, ValueError):
        return False
    if method != "SCRAM-SHA-256":
        return False
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    return hmac.compare_digest(base64.b64encode(hashlib.sha256(client_key).digest()).decode(), stored_key)


def setup_master(pair, primary_name=None, apply_settings=False):
    """Returns (settings checks, restart needed). Raises when replication cannot work."""
    settings = pair.settings
    snapshot = pair.probe()
    name = primary_name or settings.primary
    if name is None:
        if snapshot.primary is None:
            raise DbdeckError("cannot tell which node is the primary (" + ", ".join(
                f"{n.name}: {n.role}" for n in snapshot.nodes) + "); set replication.primary or pass --node")
        name = snapshot.primary.name
    node = pair.node(name)
    state = snapshot.node(name)
    if not state.reachable:
        raise DbdeckError(f"primary {name} does not answer: {state.error}")
    if state.in_recovery:
        raise Refused(f"{name} is a standby (in recovery); setup-master runs on the primary")
    pair.say(f"setting up {name} ({node.endpoint.describe()}) as the replication primary")
    user = settings.replication_user

    generated = read_password(pair, required=False) is None
    password = ensure_secret(pair, password_file(pair), f"{user} password")

    with node.connect() as conn, node.endpoint.driver_errors("setup-master"):
        ensure_role(pair, conn, user, password, generated)
        _ensure_hba(pair, node, conn, user)
        ensure_slot(pair, conn, name)
        _ensure_synchronous(pair, conn, settings.synchronous_standby_names)
        checks = check_settings(conn)
        restart = _report_and_apply(pair, conn, checks, apply_settings)
    from .roles import record_primary

    record_primary(pair, name, "setup-master")
    blocking = [c for c in checks if not c.ok and c.blocking]
    if blocking and not pair.runner.dry_run:
        fix = "restart the primary" if apply_settings else "rerun with --apply-settings, then restart the primary"
        raise DbdeckError("replication cannot work yet: " + "; ".join(f"{c.name} is {c.current}, needs {c.wanted}"
                                                                      for c in blocking) + f" ({fix})")
    return checks, restart


def ensure_role(pair, conn, user, password, generated, replication=True):
    """The role exists, can log in (with REPLICATION for the replication role) and has this password,
    set as a SCRAM verifier computed here: the password itself never reaches the server's log."""
    attributes = "LOGIN REPLICATION" if replication else "LOGIN"
    row = conn.execute("SELECT rolcanlogin, rolreplication, rolpassword FROM pg_authid WHERE rolname = %s",
                       (user,)).fetchone()
    if row and row[0] and (row[1] or not replication) and row[2] and scram_matches(row[2], password):
        pair.say(f"role {user}: present, {attributes}, password matches")
        return
    verifier = conn.pgconn.encrypt_password(password.encode(), user.encode(), b"scram-sha-256").decode()
    secrets.register(verifier)
    verb = "ALTER" if row else "CREATE"
    statement = sql.SQL(verb + f" ROLE {{}} WITH {attributes} PASSWORD {{}}").format(sql.Identifier(user),
                                                                                   sql.Literal(verifier))
    shown = f"{verb} ROLE {user} WITH {attributes} PASSWORD '***'"
    if pair.runner.dry_run:
        pair.say(f"would execute: {shown}")
        return
    conn.execute(statement)
    if row and not generated:
        pair.say(f"role {user}: updated ({shown}) to match the password file")
    elif row:
        pair.say(f"role {user}: existed with another password; set to the newly generated one: existing standbys "
                 f"must be rebuilt (rebuild-replica) or given the new password", logging.WARNING)
    else:
        pair.say(f"role {user}: created")


def _ensure_hba(pair, node, conn, user):
    hba_file = conn.execute("SHOW hba_file").fetchone()[0]
    rules = conn.execute("SELECT line_number, type, database, user_name, address, netmask, auth_method, error "
                         "FROM pg_hba_file_rules ORDER BY line_number").fetchall()
    missing = [network for network in pair.settings.replication_networks
               if not _hba_allows(rules, user, ipaddress.ip_network(network, strict=False))]
    if not missing:
        pair.say(f"pg_hba: replication from {', '.join(pair.settings.replication_networks)} already allowed "
                 f"({hba_file})")
        return
    lines = "".join(f"host    replication    {user}    {ipaddress.ip_network(n, strict=False)}    scram-sha-256\n"
                    for n in missing)
    pair.say(f"pg_hba: adding to {hba_file} on {node.name}:\n  " + lines.rstrip().replace("\n", "\n  "))
    node.driver.shell('printf "\\n# dbdeck setup-master: standby streaming\\n" >> "$1" && cat >> "$1"', hba_file,
                      stdin=lines)
    if pair.runner.dry_run:
        pair.say("would execute: SELECT pg_reload_conf()")
        return
    conn.execute("SELECT pg_reload_conf()")
    errors = conn.execute("SELECT line_number, error FROM pg_hba_file_rules WHERE error IS NOT NULL").fetchall()
    if errors:
        raise DbdeckError(f"{hba_file} has errors after the change (the server keeps its previous rules): "
                          + "; ".join(f"line {n}: {e}" for n, e in errors))


def _hba_allows(rules, user, network):
    """Whether the first rule matching a replication connection from every address of network accepts it."""
    for _line, kind, databases, users, address, netmask, method, error in rules:
        if error or kind not in ("host", "hostssl", "hostnossl"):
            continue
        if "replication" not in (databases or []):
            continue
        if not ({"all", user} & set(users or [])):
            continue
        if not _covers(address, netmask, network):
            continue
        return method not in ("reject",)
    return False


def _covers(address, netmask, network):
    if address in ("all",):
        return True
    if address in ("samehost", "samenet") or address is None:
        return False
    try:
        rule = ipaddress.ip_network(f"{address}/{netmask}" if netmask else address, strict=False)
    except ValueError:
        return False
    return rule.version == network.version and network.subnet_of(rule)


def ensure_slot(pair, conn, where, slot=None):
    """The physical replication slot (the standby's, or `slot`) on the node behind conn, created when
    missing. Returns whether a standby streams through it right now."""
    slot = slot or pair.settings.slot
    row = conn.execute("SELECT slot_type, active FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
    if row:
        if row[0] != "physical":
            raise DbdeckError(f"slot {slot} exists but is a {row[0]} slot; choose another replication.slot name")
        pair.say(f"slot {slot}: present on {where} ({'active' if row[1] else 'inactive'})")
        return row[1]
    if pair.runner.dry_run:
        pair.say(f"would execute on {where}: SELECT pg_create_physical_replication_slot('{slot}', true)")
        return False
    # reserved at once (from the last checkpoint's redo): a node rejoining after pg_rewind replays from
    # before the promotion, and nothing else keeps that WAL on a primary with wal_keep_size 0
    conn.execute("SELECT pg_create_physical_replication_slot(%s, true)", (slot,))
    pair.say(f"slot {slot}: created on {where}")
    return False


def _ensure_synchronous(pair, conn, wanted):
    current = conn.execute("SHOW synchronous_standby_names").fetchone()[0]
    if wanted is None:
        from .synchronous import remember

        remember(pair, current)  # set by hand: dbdeck keeps it across role changes
        return
    if current == wanted:
        pair.say(f"synchronous_standby_names = '{wanted}': already set")
        return
    statement = sql.SQL("ALTER SYSTEM SET synchronous_standby_names = {}").format(sql.Literal(wanted))
    if pair.runner.dry_run:
        pair.say(f"would execute: {statement.as_string(conn)}; SELECT pg_reload_conf()")
        return
    conn.execute(statement)
    conn.execute("SELECT pg_reload_conf()")
    pair.say(f"synchronous_standby_names = '{wanted}' (was '{current}'): "
             + ("commits now wait for the standby" if wanted else "commits no longer wait for a standby"))


def check_settings(conn):
    rows = {r[0]: r[1:] for r in conn.execute(
        "SELECT name, setting, unit, context, pending_restart FROM pg_settings WHERE name = ANY(%s)",
        (["wal_level", "max_wal_senders", "max_replication_slots", "wal_keep_size", "hot_standby",
          "wal_log_hints", "data_checksums", "max_slot_wal_keep_size", "max_wal_size"],)).fetchall()}

    def value(name):
        return rows[name][0]

    def restart(name):
        return rows[name][2] == "postmaster"

    checksums = value("data_checksums") == "on"
    keep_mb = int(value("wal_keep_size"))
    slot_cap = int(value("max_slot_wal_keep_size"))
    max_wal_mb = int(value("max_wal_size"))
    return [
        SettingCheck("wal_level", value("wal_level"), "replica", value("wal_level") in ("replica", "logical"),
                     True, restart("wal_level"), "standbys need WAL with replica detail"),
        SettingCheck("max_wal_senders", value("max_wal_senders"), f">= {_MIN_SENDERS}",
                     int(value("max_wal_senders")) >= _MIN_SENDERS, True, restart("max_wal_senders"),
                     "one sender per standby, one more for pg_basebackup during a rebuild"),
        SettingCheck("max_replication_slots", value("max_replication_slots"), ">= 1",
                     int(value("max_replication_slots")) >= 1, True, restart("max_replication_slots"),
                     "the standby's physical slot"),
        SettingCheck("hot_standby", value("hot_standby"), "on", value("hot_standby") == "on", False,
                     restart("hot_standby"), "read queries on this node once it becomes a standby"),
        SettingCheck("wal_log_hints", value("wal_log_hints"), "on (or data checksums)",
                     value("wal_log_hints") == "on" or checksums, False, restart("wal_log_hints"),
                     "pg_rewind needs it to turn an old primary back into a standby without a full copy"),
        SettingCheck("wal_keep_size", f"{keep_mb}MB", f">= max_wal_size ({max_wal_mb}MB) for pg_rewind after a stop "
                     f"outside dbdeck", keep_mb >= max_wal_mb, False, False,
                     "pg_rewind reads the old primary's WAL back to the last checkpoint before the failover. "
                     "dbdeck's own stops keep it (immediate, no checkpoint; the rejoin copies it aside for "
                     "--restore-target-wal), but a clean stop by anyone else (docker stop, systemctl stop) "
                     "recycles it, and the rejoin then needs a full copy. Costs that much disk on each node, so "
                     "--apply-settings leaves it to you: ALTER SYSTEM SET wal_keep_size = "
                     f"'{max_wal_mb}MB'. The standby's own WAL is kept by the slot" + (
                         "; max_slot_wal_keep_size is unlimited: a standby down for long can fill the disk"
                         if slot_cap < 0 else f"; max_slot_wal_keep_size caps it at {slot_cap}MB")),
    ]


# what --apply-settings sets (wal_keep_size costs disk: it stays the user's choice)
_APPLIED = {"wal_level": "replica", "max_wal_senders": "10", "max_replication_slots": "10", "hot_standby": "on",
            "wal_log_hints": "on"}


def _report_and_apply(pair, conn, checks, apply_settings):
    restart_needed = []
    for check in checks:
        mark = "ok  " if check.ok else ("FIX " if check.blocking else "warn")
        pair.say(f"  {mark} {check.name} = {check.current} (wanted {check.wanted}): {check.why}")
    wrong = [c for c in checks if not c.ok and c.name in _APPLIED]
    if wrong and apply_settings:
        for check in wrong:
            target = _APPLIED[check.name]
            statement = sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(check.name), sql.Literal(target))
            if pair.runner.dry_run:
                pair.say(f"would execute: {statement.as_string(conn)}")
                continue
            conn.execute(statement)
            pair.say(f"  set {check.name} = {target} (ALTER SYSTEM)")
            if check.needs_restart:  # stays not ok until the restart
                check.current = f"{check.current} ({target} after restart)"
                restart_needed.append(check.name)
            else:
                check.current, check.ok = target, True
        if not pair.runner.dry_run:
            conn.execute("SELECT pg_reload_conf()")
    elif wrong:
        pair.say("settings marked FIX/warn: rerun with --apply-settings to set them with ALTER SYSTEM")
    if restart_needed:
        pair.say(f"RESTART the primary for {', '.join(restart_needed)} to take effect", logging.WARNING)
    return restart_needed
