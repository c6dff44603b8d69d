"""`dbdeck pitr`: base backups and WAL of the pair's primary kept by Barman, restores to a point in time,
and restores that are proven (`pitr verify`) rather than hoped for.

dbdeck adds to Barman what it lacks: the configuration from dbdeck's YAML, the replication role's
privileges and a reserved slot, following the primary after a failover (a new base backup closes the
gap in the WAL chain), restores that refuse to overwrite a running server or the primary, and a
scheduled restore of the latest backup and of a point inside the recovery window into a throwaway
cluster that must start, pass pg_amcheck and answer the configured queries.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import shutil
import socket
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from psycopg import sql

from dbdeck import faults, output
from dbdeck.errors import DbdeckError, Refused, UsageError
from dbdeck.events import Event

from .barman import NOT_YET, Barman, parse_time, settings_of
from .setup import ensure_slot as ensure_slot_on_connection
from .setup import read_password

log = logging.getLogger("dbdeck.replication")

# what the replication role needs for Barman's backups besides REPLICATION (PostgreSQL 15 and later)
_GRANTS = ("GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean) TO {role}",
           "GRANT EXECUTE ON FUNCTION pg_backup_stop(boolean) TO {role}",
           "GRANT EXECUTE ON FUNCTION pg_switch_wal() TO {role}",
           "GRANT EXECUTE ON FUNCTION pg_create_restore_point(text) TO {role}",
           "GRANT pg_read_all_settings, pg_read_all_stats, pg_checkpoint TO {role}")


# --- the primary Barman streams from ----------------------------------------------------------------
def current_primary(pair):
    snapshot = pair.probe()
    primaries = snapshot.primaries
    if len(primaries) != 1:
        roles = ", ".join(f"{n.name}: {n.role}" for n in snapshot.nodes)
        raise DbdeckError(f"backups need exactly one reachable primary ({roles})")
    return pair.node(primaries[0].name)


def server_bindir(pair, node):
    """PostgreSQL's programs of the server's major version (Barman's pg_basebackup must not be older)."""
    configured = settings_of(pair).bindir
    if configured:
        return Path(configured)
    with node.connect() as conn, node.endpoint.driver_errors("server version"):
        major = int(conn.execute("SHOW server_version_num").fetchone()[0]) // 10000
    candidate = Path(f"/usr/lib/postgresql/{major}/bin")
    if (candidate / "pg_basebackup").exists():
        return candidate
    found = shutil.which("pg_basebackup")
    if not found:
        raise DbdeckError(f"no pg_basebackup for PostgreSQL {major} on this host: install postgresql-client-{major} "
                          f"or set replication.backup.bindir")
    return Path(found).parent


def _grant_backup_privileges(pair, conn):
    role = sql.Identifier(pair.settings.replication_user)
    for statement in _GRANTS:
        query = sql.SQL(statement).format(role=role)
        if pair.runner.dry_run:
            pair.say(f"would execute: {query.as_string(conn)}")
        else:
            conn.execute(query)
    if not pair.runner.dry_run:
        pair.say(f"role {pair.settings.replication_user}: may run base backups (pg_backup_start/stop, "
                 f"pg_switch_wal, pg_checkpoint)")


def _ensure_barman_slot(pair, conn, where):
    ensure_slot_on_connection(pair, conn, where, slot=settings_of(pair).slot)


def switch_wal_and_wait(pair, barman, primary):
    """Close the primary's current WAL segment and wait until Barman has archived it: the restore of a
    moment that just passed needs it (pg_receivewal keeps an unfinished segment as .partial)."""
    if pair.runner.dry_run:
        pair.say(f"would execute on {primary.name}: SELECT pg_switch_wal(), then wait for Barman to archive it")
        return None
    with primary.connect() as conn, primary.endpoint.driver_errors("switch WAL"):
        # a commit record stamped now: recovery to a time stops at the first commit after it, and without
        # one (an idle database) PostgreSQL ends recovery with "before configured recovery target was reached"
        conn.execute("SELECT pg_current_xact_id()")
        conn.commit()  # before the switch: the commit record must be in the segment that gets archived
        segment = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
        # an idle server does not switch: then the segment before is complete already
        conn.execute("SELECT pg_switch_wal()")
        # pg_receivewal closes a segment once WAL of the next one arrives: on an idle server that is only at
        # its next status interval (10 s). A commit puts a record in the next segment now.
        conn.execute("SELECT pg_current_xact_id()")
        conn.commit()

    def archived():
        if segment in barman.wal_files():
            return True
        if not barman.received(segment):
            return False  # pg_receivewal still writes it: `barman archive-wal` would have nothing to move
        barman.archive_now()
        return segment in barman.wal_files()

    pair.wait_for(archived, f"Barman to archive WAL segment {segment}")
    return segment


# --- setup ------------------------------------------------------------------------------------------
def setup(pair, first_backup=True):
    barman = Barman(pair)
    primary = current_primary(pair)
    password = read_password(pair)
    bindir = server_bindir(pair, primary)
    host, port = primary.replication_address
    pair.say(f"Barman server {barman.name}: streaming from {primary.name} ({host}:{port}) as "
             f"{pair.settings.replication_user}, slot {barman.settings.slot}, {barman.settings.retention_policy}")
    with primary.connect() as conn, primary.endpoint.driver_errors("pitr setup"):
        _grant_backup_privileges(pair, conn)
        _ensure_barman_slot(pair, conn, primary.name)
    barman.write_config(primary, bindir, password)
    if pair.runner.dry_run:
        pair.say("would start Barman's WAL receiver (barman cron), switch WAL, and take the first base backup")
        return {"server": barman.name, "primary": primary.name, "ok": True, "dry_run": True}
    pair.say(f"configuration written under {barman.home} (barman -c {barman.config_file})")
    barman.start_receiver()
    pair.wait_for(lambda: _receiver_streams(primary, barman), f"Barman's WAL receiver to stream from {primary.name}")
    switch_wal_and_wait(pair, barman, primary)
    first_setup = barman.state.entry("server").get("configured") or output.timestamp()
    barman.state.update("server", primary=primary.name, configured=first_setup)
    if first_backup and not barman.backups():
        create(pair, barman)
    return report_checks(pair, barman)


def report_checks(pair, barman):
    checks = barman.checks()
    failing = {name: hint for name, (ok, hint) in checks.items() if not ok}
    blocking = {name: hint for name, hint in failing.items() if name not in NOT_YET}
    for name, (ok, hint) in sorted(checks.items()):
        if not ok:
            level = logging.WARNING if name in NOT_YET else logging.ERROR
            pair.say(f"barman check: {name.replace('_', ' ')}: FAILED" + (f" ({hint})" if hint else ""), level)
    if not failing:
        pair.say(f"barman check {barman.name}: all {len(checks)} checks OK")
    return {"server": barman.name, "ok": not blocking, "checks": {n: {"ok": ok, "hint": h} for n, (ok, h) in
                                                                  sorted(checks.items())},
            "failing": sorted(failing)}


# --- a base backup now --------------------------------------------------------------------------------
def create(pair, barman=None):
    barman = barman or Barman(pair)
    if pair.runner.dry_run:
        barman.run("backup", "--wait", barman.name)
        return {"server": barman.name, "dry_run": True}
    started = time.monotonic()
    pair.say(f"base backup of {barman.name} (pg_basebackup through Barman)")
    before = {b["backup_id"] for b in barman.backups()}
    result = barman.run("backup", "--wait", barman.name, check=False, timeout=24 * 3600)
    new = [b for b in barman.backups() if b["backup_id"] not in before]
    if result.returncode != 0 or not new or new[-1].get("status") != "DONE":
        reason = _last_error_line(result.stdout + "\n" + result.stderr)
        pair.app.record_result("pitr create", "backup", False, f"backup failed: {reason}")
        raise DbdeckError(f"barman backup {barman.name} failed: {reason}")
    backup = new[-1]
    seconds = round(time.monotonic() - started, 1)
    end = parse_time(backup.get("end_time_timestamp"))
    barman.state.update("last_backup", id=backup["backup_id"], end=output.timestamp(end.timestamp()),
                        size_bytes=backup.get("size_bytes"), seconds=seconds)
    pending = barman.state.entry("chain").get("pending_since")
    if pending:
        barman.state.update("chain", pending_since=None, closed=output.timestamp(), closed_by=backup["backup_id"])
        pair.say(f"the WAL chain is whole again: base backup {backup['backup_id']} was taken after the failover")
    summary = f"base backup {backup['backup_id']}: {output.human_bytes(backup.get('size_bytes'))} in {seconds}s"
    pair.say(summary)
    pair.app.record_result("pitr create", "backup", True, summary, seconds, backup_id=backup["backup_id"],
                           size_bytes=backup.get("size_bytes"))
    return {"server": barman.name, "backup_id": backup["backup_id"], "size_bytes": backup.get("size_bytes"),
            "seconds": seconds, "end_time": output.timestamp(end.timestamp())}


def _last_error_line(text):
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "ERROR" in line or "error" in line]
    return (errors or lines or ["no output"])[-1]


# --- list ---------------------------------------------------------------------------------------------
def listing(pair):
    barman = Barman(pair)
    now = datetime.now(timezone.utc)
    rows = []
    for entry in barman.backups():
        detail = barman.show(entry["backup_id"]) if entry.get("status") == "DONE" else {}
        base = detail.get("base_backup_information", {})
        wal = detail.get("wal_information", {})
        end = parse_time(entry.get("end_time_timestamp"))
        rows.append({
            "backup_id": entry["backup_id"],
            "status": entry.get("status"),
            "end_time": output.timestamp(end.timestamp()) if end else None,
            "age_seconds": round((now - end).total_seconds()) if end else None,
            "size_bytes": entry.get("size_bytes"),
            "wal_size_bytes": entry.get("wal_size_bytes"),
            "begin_wal": base.get("begin_wal"),
            "last_wal": wal.get("last_available"),
            "timeline": base.get("timeline"),
            "retention": entry.get("retention_status"),
        })
    rows.reverse()  # newest first, as deploy's `backup list`
    return {"server": barman.name, "backups": rows, "recovery_window": recovery_window(barman, rows)}


def recovery_window(barman, rows=None):
    """(earliest, latest) restorable times: from the end of the oldest complete backup to now."""
    done = [r for r in (rows or []) if r.get("status") == "DONE" and r.get("end_time")]
    if not done:
        return None
    return {"from": min(r["end_time"] for r in done), "to": output.timestamp()}


def render_listing(data):
    from rich.table import Table

    rows = data["backups"]
    if not rows:
        return f"no base backups of {data['server']} yet: `dbdeck pitr create` takes one"
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("BACKUP", "STATUS", "ENDED", "AGE", "SIZE", "WAL SIZE", "WAL FROM", "WAL TO", "TL"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["backup_id"], row["status"], (row["end_time"] or "-").replace("T", " ")[:19],
                      output.human_duration(row["age_seconds"]), output.human_bytes(row["size_bytes"]),
                      output.human_bytes(row["wal_size_bytes"]), row["begin_wal"] or "-", row["last_wal"] or "-",
                      str(row["timeline"] or "-"))
    window = data.get("recovery_window")
    footer = (f"\nrestorable from {window['from']} to now" if window else "")
    return output.render(table) + footer


# --- check ----------------------------------------------------------------------------------------------
def check(pair):
    """Barman's checks plus dbdeck's: the last backup's age, the WAL chain after a failover, the last
    verified restore. (ok, report)."""
    barman = Barman(pair)
    report = report_checks(pair, barman)
    problems = [f"barman: {name.replace('_', ' ')}" for name in report["failing"] if name not in NOT_YET]
    problems += backup_problems(barman)
    report["problems"] = problems
    report["ok"] = not problems
    return report


def backup_problems(barman):
    """dbdeck's own verdicts from its state file (quick: no Barman call)."""
    settings = barman.settings
    state = barman.state.read()
    problems = []
    now = time.time()
    last = (state.get("last_backup") or {}).get("end")
    from dbdeck.status import epoch

    if not last:
        problems.append("no base backup yet")
    elif now - epoch(last) > settings.max_age_hours * 3600:
        problems.append(f"the last base backup ended {output.human_duration(now - epoch(last))} ago "
                        f"(max_age_hours {settings.max_age_hours:g})")
    receiver = state.get("receiver") or {}
    if receiver.get("checked") and not receiver.get("streaming"):
        problems.append(f"Barman's WAL receiver was not streaming at {receiver['checked']} (`dbdeck pitr check`)")
    elif receiver.get("checked") and now - epoch(receiver["checked"]) > 15 * 60:
        problems.append(f"Barman's WAL receiver was last checked at {receiver['checked']}: is the pitr-maintain job "
                        f"installed (`dbdeck schedule install`)?")
    chain = state.get("chain") or {}
    if chain.get("pending_since"):
        problems.append(f"WAL chain has a hole since {chain.get('reason') or 'the failover'} at "
                        f"{chain['pending_since']}: restores to a later time need a new base backup "
                        f"(`dbdeck pitr create`, or `pitr maintain` within a minute)")
    verified = (state.get("last_verify") or {})
    configured = (state.get("server") or {}).get("configured")
    if not verified.get("last_success"):
        # a new set-up has until its first scheduled verification; after that, never verified is a problem
        if not configured or now - epoch(configured) > settings.verify_max_age_days * 86400:
            problems.append("no restore has been verified yet (`dbdeck pitr verify`)")
    elif now - epoch(verified["last_success"]) > settings.verify_max_age_days * 86400:
        problems.append(f"the last verified restore is {output.human_duration(now - epoch(verified['last_success']))} "
                        f"old (verify_max_age_days {settings.verify_max_age_days:g})")
    if verified and verified.get("ok") is False:
        problems.append(f"the last restore verification failed: {verified.get('summary')}")
    return problems


# --- restore --------------------------------------------------------------------------------------------
class Target:
    """Where a restore ends up: a new directory on this host, or a stopped node's data directory (reached
    through its driver: a local directory, a systemd unit's, or a container's volume)."""

    def __init__(self, directory, node=None, os_user=None, primary=False):
        self.directory = Path(directory) if node is None else None
        self.node = node
        self.os_user = os_user
        self.primary = primary

    def describe(self):
        return f"node {self.node.name} ({self.node.driver.describe()})" if self.node else str(self.directory)


def resolve_target(pair, target, allow_primary=False):
    names = {n.name for n in pair.nodes}
    if target in names:
        node = pair.node(target)
        if node.driver.is_running():
            raise Refused(f"{node.name} is running: stop it first; a restore never writes under a running server")
        # the primary now; while none answers, the one the configuration names
        primaries = [p.name for p in pair.probe(timeout=3).primaries] or [pair.settings.primary]
        is_primary = node.name in primaries
        if is_primary and not allow_primary:
            raise Refused(f"{node.name} is the primary: restoring over it replaces the only writable copy; "
                          f"pass --allow-primary if that is what you mean (its files are kept aside)")
        return Target(None, node=node, primary=is_primary)
    directory = Path(target)
    if not directory.is_absolute():
        raise UsageError(f"--target {target!r}: give a node name ({', '.join(sorted(names))}) or an absolute "
                         f"directory")
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"--target {directory} is a file, not a directory: give a new or empty directory, or "
                         f"a node name ({', '.join(sorted(names))})")
    if directory.exists() and any(directory.iterdir()):
        raise Refused(f"{directory} is not empty: a restore writes into a new or empty directory only")
    if not directory.parent.is_dir():
        raise UsageError(f"{directory.parent} does not exist")
    return Target(directory, os_user="postgres" if os.geteuid() == 0 else None)


def choose_backup(barman, to_time):
    done = [b for b in barman.backups() if b.get("status") == "DONE"]
    if not done:
        raise DbdeckError(f"no complete base backup of {barman.name} to restore from (`dbdeck pitr create`)")
    if to_time is None:
        return done[-1]
    usable = [b for b in done if parse_time(b["end_time_timestamp"]) < to_time]
    if not usable:
        first = parse_time(done[0]["end_time_timestamp"])
        raise Refused(f"{to_time.isoformat()} is before the oldest restorable moment ({first.isoformat()}, the end of "
                      f"base backup {done[0]['backup_id']}): nothing can restore it")
    return usable[-1]


def parse_target_time(text):
    try:
        value = datetime.fromisoformat(text.strip().replace(" ", "T", 1) if "T" not in text else text.strip())
    except ValueError:
        raise UsageError(f"--to-time {text!r}: expected ISO 8601, e.g. 2026-12-03T10:15:00+00:00") from None
    if value.tzinfo is None:
        # the local time zone, as `date` prints it; a wall-clock time the clocks skipped (spring forward) or
        # showed twice (fall back) names no single moment, and guessing would restore the wrong hour
        first, second = value.replace(fold=0).astimezone(), value.replace(fold=1).astimezone()
        if first != second:
            skipped = first.replace(tzinfo=None) != value and second.replace(tzinfo=None) != value
            raise UsageError(f"--to-time {text!r}: the local clock {'skipped' if skipped else 'showed twice'} that "
                             f"time (a daylight-saving change in {first.tzname()}/{second.tzname()}): give the offset, "
                             f"e.g. {first.isoformat()} or {second.isoformat()}")
        value = first
    if value > datetime.now(timezone.utc) + timedelta(seconds=1):
        raise Refused(f"--to-time {value.isoformat()} is in the future")
    return value


def restore(pair, target, to_time=None, allow_primary=False, quiet=False):
    """Restore the backup chain into target (a node name or a directory), to_time (aware datetime) or the
    latest WAL. Returns a summary dict."""
    barman = Barman(pair)
    place = resolve_target(pair, target, allow_primary)
    backup = choose_backup(barman, to_time)
    primary = _reachable_primary(pair)
    what = f"to {to_time.isoformat()}" if to_time else "to the latest WAL"
    pair.say(f"restoring {barman.name} {what} from base backup {backup['backup_id']} into {place.describe()}")
    if primary is not None:
        switch_wal_and_wait(pair, barman, primary)
    stamp = time.strftime("%Y%m%d%H%M%S")
    # Barman writes on this host; a node's copy then goes in through its driver
    workspace = place.directory or barman.home / f"restore-{place.node.name}-{stamp}"
    if place.node and not pair.runner.dry_run:
        _remove_leftovers(pair, barman, place.node.name)
    if pair.runner.dry_run:
        barman.run("recover", *_recover_options(to_time), barman.name, backup["backup_id"], workspace)
        if place.node:
            pair.say(f"would move {place.node.name}'s files aside to {_ASIDE}{stamp} in its data directory and put "
                     f"the restored copy in their place")
        return {"dry_run": True, "backup_id": backup["backup_id"], "target": place.describe()}
    kept = None
    try:
        _give(workspace, barman.os_user, create=True)
        barman.run("recover", *_recover_options(to_time), barman.name, backup["backup_id"], workspace,
                   timeout=24 * 3600)
        if to_time is not None:
            _wal_through_first_commit_after(pair, barman, workspace, to_time)
        if to_time is None and primary is None:
            _add_unfinished_segment(pair, barman, workspace)
        _neutralise(workspace, place)
        if place.node:
            kept = _into_node(pair, place.node, workspace, stamp)
            if place.primary:  # started, a new timeline from the restored moment: it needs a new base backup
                barman.state.update("chain", pending_since=output.timestamp(),
                                    reason=f"the restore of {place.node.name}")
                from .roles import record_primary

                record_primary(pair, place.node.name, "pitr restore --allow-primary")
        else:
            _give_tree(workspace, place.os_user)
    except BaseException:
        if place.directory is not None:
            shutil.rmtree(workspace, ignore_errors=True)
        raise
    finally:
        if place.node is not None:
            shutil.rmtree(workspace, ignore_errors=True)
    if not quiet:
        pair.app.notify(Event("backup.restored", f"{barman.name} restored {what} into {place.describe()}",
                              details={"backup_id": backup["backup_id"], "target": place.describe()}))
        start = (f"start {place.node.name} ({place.node.driver.describe()}): it replays WAL {what}, then "
                 + ("accepts writes" if place.primary else
                    "stays read-only there (a standby of nothing, never a second primary); to make it the "
                    f"primary: promote-replica --fence --node {place.node.name} (stops the other, the write "
                    f"endpoint follows), then rebuild-replica --node <the other>; to drop it: rebuild-replica "
                    f"--node {place.node.name}")
                 + f"; its previous files are in {kept} inside its data directory until you remove them"
                 if place.node else
                 f"start it with pg_ctl -D {place.directory} -o '-p PORT' start: it replays WAL {what}, then accepts "
                 f"writes")
        pair.say(start)
    return {"backup_id": backup["backup_id"], "target": place.describe(),
            "to_time": to_time.isoformat() if to_time else None, "kept_aside": kept}


def _remove_leftovers(pair, barman, name):
    """A restore into this node killed before its cleanup left its workspace and tar in Barman's home: the
    whole database, taking disk space. The operator lock makes sure no other restore is running."""
    for leftover in barman.home.glob(f"restore-{name}-*"):
        pair.say(f"removing {leftover.name}, left by an interrupted restore", logging.WARNING)
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


_ASIDE = ".dbdeck-before-restore-"
# $1 the restored copy, $2 the data directory: every entry moves up (a rename when both are on one
# filesystem: no copy at all), dotfiles too
_MOVE_IN = r"""set -eu
copy=$1; data=$2
for entry in "$copy"/* "$copy"/.[!.]* "$copy"/..?*; do
    [ -e "$entry" ] || [ -L "$entry" ] || continue
    mv "$entry" "$data/"
done
chmod 700 "$data"
"""
# $1 data directory: the restored files come out of the tar on stdin
_EXTRACT = r"""set -eu
tar -C "$1" -xf -
chmod 700 "$1"
"""
# $1 data directory, $2 the aside name: whatever the failed extraction left goes, the old files come back
_PUT_BACK = r"""set -eu
data=$1; aside=$2
rm -f "$data/PG_VERSION"
for entry in "$data"/* "$data"/.[!.]* "$data"/..?*; do
    [ -e "$entry" ] || [ -L "$entry" ] || continue
    case "${entry##*/}" in "$aside") continue;; esac
    rm -rf "$entry"
done
"""


def _into_node(pair, node, workspace, stamp):
    """The restored copy into the stopped node's data directory, its current files moved into a
    subdirectory first (put back if anything fails). Returns the subdirectory's name.

    global/pg_control goes in last, on its own: until it is in place the directory cannot start at all, so a
    restore killed on the way never leaves a startable half (one that could come up as a primary). On this
    host the files are renamed into place (the node's user owns them first); into a container they stream
    through one tar pipe, never written twice."""
    from .standby import MOVE_ASIDE, MOVE_UP

    driver = node.driver
    data = driver.data_dir
    aside = f"{_ASIDE}{stamp}"
    control = workspace.with_name(workspace.name + ".control")
    (control / "global").mkdir(mode=0o700, parents=True, exist_ok=True)
    os.rename(workspace / "global" / "pg_control", control / "global" / "pg_control")
    if driver.files_on_this_host:
        _give_tree(workspace, driver.os_user)
        _give_tree(control, driver.os_user)
    driver.shell(MOVE_ASIDE, data, aside, offline=True)
    try:
        if driver.files_on_this_host:
            driver.shell(_MOVE_IN, workspace, data, offline=True, timeout=24 * 3600)
            faults.point("restore.files-extracted")
            driver.shell('mv "$1/global/pg_control" "$2/global/"', control, data, offline=True, timeout=600)
        else:
            pair.runner.pipeline([(["tar", "-C", workspace, "-cf", "-", "."], None),
                                  (driver.shell_argv(_EXTRACT, data, offline=True), None)], timeout=24 * 3600)
            faults.point("restore.files-extracted")
            pair.runner.pipeline([(["tar", "-C", control, "-cf", "-", "./global/pg_control"], None),
                                  (driver.shell_argv(_EXTRACT, data, offline=True), None)], timeout=600)
    except BaseException:
        pair.say(f"restore into {node.name} failed: putting its previous files back", logging.ERROR)
        driver.shell(_PUT_BACK, data, aside, offline=True)
        driver.shell(MOVE_UP, data, aside, offline=True)
        raise
    finally:
        shutil.rmtree(control, ignore_errors=True)
    return aside


_COMMIT = re.compile(r"desc: (?:COMMIT|ABORT) (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC")


def _wal_through_first_commit_after(pair, barman, workspace, to_time):
    """Barman copies WAL up to the first segment *completed* after the target time, assuming it holds a
    commit after it. When that segment is filled by something else (a bulk load's data pages, CREATE
    DATABASE copying a template), the commit after the target is in a later segment, and PostgreSQL ends
    with "recovery ended before configured recovery target was reached". Add segments until one has a
    commit (or abort) stamped after the target, as pg_waldump reads them."""
    copied_dir = workspace / "barman_wal"
    segments = [name for name in barman.wal_files() if re.fullmatch(r"[0-9A-F]{24}", name)]
    copied = sorted(p.name for p in copied_dir.iterdir() if re.fullmatch(r"[0-9A-F]{24}", p.name)) \
        if copied_dir.is_dir() else []
    if not copied:
        return
    waldump = _bindir_from_config(barman) / "pg_waldump"
    for name in [copied[-1], *(n for n in segments if n > copied[-1])]:
        archived = barman.data / barman.name / "wals" / name[:16] / name
        if name not in copied:
            shutil.copyfile(archived, copied_dir / name)
            _give(copied_dir / name, barman.os_user)
        dump = pair.runner.run([waldump, "-r", "Transaction", archived], env={"TZ": "UTC"}, check=False,
                               read_only=True, timeout=300)
        for stamp in _COMMIT.findall(dump.stdout or ""):
            if datetime.fromisoformat(stamp).replace(tzinfo=timezone.utc) > to_time:
                if name != copied[-1]:
                    pair.say(f"added WAL through {name}: its commit at {stamp} UTC is the first after the target")
                return


def _recover_options(to_time):
    # the latest timeline: without it Barman copies only the backup's timeline's WAL, and a restore to a
    # moment after a failover or switchover stops short of it
    timeline = ["--target-tli", "latest"]
    if to_time is None:
        return timeline
    return [*timeline, "--target-time", to_time.isoformat(), "--target-action", "promote"]


def _reachable_primary(pair):
    try:
        return current_primary(pair)
    except DbdeckError:
        return None


def _add_unfinished_segment(pair, barman, directory):
    """With the primary gone, the last WAL Barman received is in an unfinished .partial segment: recovery
    reads it from pg_wal under its real name (what Barman's documentation advises)."""
    partial = barman.streaming_partial()
    if partial is None:
        return
    destination = directory / "pg_wal" / partial.name[:-len(".partial")]
    shutil.copyfile(partial, destination)
    pair.say(f"the primary is unreachable: added the unfinished WAL segment {destination.name} Barman received")


# A restored copy starts without the pair around it: commits must not wait for a standby that is not there,
# and it must not archive into or stream from the old primary's places.
_RESTORED_SETTINGS = {"synchronous_standby_names": "", "primary_conninfo": "", "primary_slot_name": "",
                      "archive_mode": "off"}


def _neutralise(directory, place):
    """A restored copy stands alone. Restored into a node that is not the pair's primary, it also stays
    read-only: a standby of nothing (standby.signal, no primary_conninfo) that replays to the target and
    pauses there, so it never takes writes beside the primary; promote-replica --fence makes it the primary."""
    from .standby import setting_line

    settings = dict(_RESTORED_SETTINGS)
    if place.node and not place.primary:
        (directory / "standby.signal").write_text("")
        settings["recovery_target_action"] = "pause"
    else:
        (directory / "standby.signal").unlink(missing_ok=True)
    if place.node:
        settings.update(place.node.config.settings)
    with open(directory / "postgresql.auto.conf", "a") as out:
        out.write("# dbdeck pitr restore: a restored copy stands alone\n")
        out.write("".join(setting_line(k, v) for k, v in settings.items()))


def _give(path, user, create=False):
    if create:
        path.mkdir(mode=0o700, exist_ok=True)
    if user and os.geteuid() == 0:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _give_tree(directory, user):
    if not user or os.geteuid() != 0:
        return
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(directory):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in (*dirs, *files):
            os.lchown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)
    os.chmod(directory, 0o700)


# --- verify ---------------------------------------------------------------------------------------------
def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ThrowawayCluster:
    """A restored copy started on a private socket directory (no TCP), trust authentication on that socket
    only, removed afterwards."""

    def __init__(self, pair, directory, bindir, os_user):
        self.pair, self.directory, self.bindir, self.os_user = pair, Path(directory), Path(bindir), os_user
        # short and private: a Unix socket path has at most 107 bytes
        self.socket_dir = Path(tempfile.mkdtemp(prefix="dbdeck-verify-"))
        self.port = free_port()

    def start(self, timeout):
        _give(self.socket_dir, self.os_user)
        hba = self.socket_dir / "pg_hba.conf"
        hba.write_text("local all all trust\n")
        _give(hba, self.os_user)
        options = (f"-c port={self.port} -c listen_addresses='' -c unix_socket_directories='{self.socket_dir}' "
                   f"-c hba_file='{hba}' -c archive_mode=off -c synchronous_standby_names='' -c logging_collector=off")
        started = self.pair.runner.run([self.bindir / "pg_ctl", "-D", self.directory, "-l",
                                        f"{self.socket_dir}/server.log", "-o", options, "-w", "-t", int(timeout),
                                        "start"], as_user=self.os_user, timeout=timeout + 10, check=False)
        self.start_output = " / ".join(line.strip() for line in (started.stdout + started.stderr).splitlines()
                                       if line.strip())
        return started.returncode == 0

    def log_tail(self):
        """The server log's reason: its FATAL/PANIC/ERROR lines, else its last line."""
        try:
            lines = [line.strip() for line in (self.socket_dir / "server.log").read_text(errors="replace").splitlines()
                     if line.strip()]
        except OSError:
            return ""
        reasons = [line for line in lines if any(word in line for word in ("FATAL:", "PANIC:", "ERROR:"))]
        return " / ".join(reasons[-3:] or lines[-1:])

    def connect(self, database="postgres"):
        import psycopg

        return psycopg.connect(host=str(self.socket_dir), port=self.port, user="postgres", dbname=database,
                               autocommit=True, connect_timeout=5)

    def writable(self):
        try:
            with self.connect() as conn:
                return conn.execute("SELECT NOT pg_is_in_recovery()").fetchone()[0]
        except Exception:  # noqa: BLE001 - starting up, or not at all: the caller's deadline decides
            return False

    def stop_and_remove(self):
        self.pair.runner.run([self.bindir / "pg_ctl", "-D", self.directory, "-m", "immediate", "-w", "stop"],
                             as_user=self.os_user, check=False, timeout=60)
        shutil.rmtree(self.directory, ignore_errors=True)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def verify(pair, keep=False):
    """Restore the latest backup and a point inside the recovery window into throwaway clusters; each must
    start, reach the end of recovery, pass pg_amcheck and (latest) answer the configured checks."""
    barman = Barman(pair)
    settings = barman.settings
    started = time.monotonic()
    steps = []
    try:
        if pair.runner.dry_run:
            pair.say("would run barman verify-backup on the latest backup, restore it and a point in the recovery "
                     "window into throwaway clusters, start them, run pg_amcheck and the configured checks")
            return {"dry_run": True}
        done = [b for b in barman.backups() if b.get("status") == "DONE"]
        if not done:
            raise DbdeckError(f"no complete base backup of {barman.name} to verify (`dbdeck pitr create`)")
        latest = done[-1]
        result = barman.run("verify-backup", barman.name, latest["backup_id"], check=False, timeout=3600)
        if result.returncode != 0 or "ERROR" in result.stdout + result.stderr:
            raise DbdeckError(f"backup {latest['backup_id']} does not match its manifest: "
                              f"{_last_error_line(result.stdout + chr(10) + result.stderr)}")
        steps.append({"step": "manifest", "backup_id": latest["backup_id"], "ok": True})
        pair.say(f"backup {latest['backup_id']}: every file matches its backup_manifest checksum")
        oldest_end = parse_time(done[0]["end_time_timestamp"])
        now = datetime.now(timezone.utc)
        points = [("latest", None)]
        if (now - oldest_end).total_seconds() > 2:
            points.append(("point in time", oldest_end + (now - oldest_end) / 2))
        root = Path(settings.restore_dir or barman.home / "verify")
        root.mkdir(parents=True, exist_ok=True, mode=0o755)
        _remove_verify_leftovers(pair, barman, root)
        for label, moment in points:
            steps.append(_verify_one(pair, barman, root, label, moment, keep))
    except DbdeckError as exc:
        summary = f"verification failed: {exc}"
        _record_verify(pair, barman, False, summary, time.monotonic() - started, steps)
        raise DbdeckError(summary) from None
    seconds = round(time.monotonic() - started, 1)
    summary = (f"restore verified: {', '.join(s['label'] for s in steps if 'label' in s)} started, "
               f"pg_amcheck clean, {sum(len(s.get('checks', [])) for s in steps)} checks passed in {seconds}s")
    _record_verify(pair, barman, True, summary, seconds, steps)
    log.info(summary)  # printed once, by the command (as text or in its JSON)
    return {"ok": True, "summary": summary, "seconds": seconds, "steps": steps}


def _verify_one(pair, barman, root, label, moment, keep):
    stamp = time.strftime("%Y%m%d%H%M%S")
    directory = root / f"{barman.name}-{label.replace(' ', '-')}-{stamp}"
    restore(pair, str(directory), to_time=moment, quiet=True)
    bindir = _bindir_from_config(barman)
    os_user = "postgres" if os.geteuid() == 0 else None
    cluster = ThrowawayCluster(pair, directory, bindir, os_user)
    step = {"label": label, "to_time": moment.isoformat() if moment else None, "ok": False}
    try:
        if not cluster.start(timeout=pair.settings.wait_timeout):
            raise DbdeckError(f"the restored copy ({label}) did not start: "
                              f"{cluster.log_tail() or cluster.start_output}")
        try:
            pair.wait_for(cluster.writable, f"the restored copy ({label}) to finish recovery")
        except DbdeckError:
            raise DbdeckError(f"the restored copy ({label}) did not finish recovery: {cluster.log_tail()}") from None
        pair.say(f"{label}: the restored copy started and finished recovery on port {cluster.port}")
        faults.point("verify.started")
        if barman.settings.amcheck:
            amcheck = pair.runner.run([bindir / "pg_amcheck", "--all", "--install-missing", "-h", cluster.socket_dir,
                                       "-p", cluster.port, "-U", "postgres", "--no-password"],
                                      as_user=os_user, check=False, timeout=24 * 3600)
            if amcheck.returncode != 0:
                raise DbdeckError(f"pg_amcheck found corruption in the restored copy ({label}): "
                                  f"{_last_error_line(amcheck.stdout + chr(10) + amcheck.stderr)}")
            pair.say(f"{label}: pg_amcheck found no corruption")
        if moment is None:
            step["checks"] = _run_checks(pair, cluster, barman.settings.checks)
        step["ok"] = True
        return step
    finally:
        if keep:
            (directory / _KEPT).touch()
            pair.say(f"kept the restored copy ({label}) running on {cluster.socket_dir} port {cluster.port}")
        else:
            cluster.stop_and_remove()


_KEPT = ".dbdeck-kept"  # a copy `pitr verify --keep` left on purpose


def _remove_verify_leftovers(pair, barman, root):
    """The throwaway clusters a verify killed half-way left (still running, on a copy of the whole
    database): stopped and removed, and said so. The pitr-verify lock rules out a verify still at work;
    copies kept on purpose (--keep) are only named."""
    for directory in sorted(root.glob(f"{barman.name}-*")):
        if not directory.is_dir():
            continue
        if (directory / _KEPT).exists():
            pair.say(f"{directory} is a restored copy an earlier `pitr verify --keep` left; stop it and remove it "
                     f"when you are done with it")
            continue
        try:
            lines = (directory / "postmaster.pid").read_text().splitlines()
        except OSError:
            lines = []
        if lines:
            pair.runner.run([_bindir_from_config(barman) / "pg_ctl", "-D", directory, "-m", "immediate", "-w", "stop"],
                            as_user="postgres" if os.geteuid() == 0 else None, check=False, timeout=60)
        shutil.rmtree(directory, ignore_errors=True)
        socket_dir = Path(lines[4]) if len(lines) > 4 else None
        if socket_dir is not None and socket_dir.name.startswith("dbdeck-verify-"):
            shutil.rmtree(socket_dir, ignore_errors=True)
        pair.say(f"removed {directory}, a throwaway copy an interrupted verify left"
                 + (" (its server was still running: stopped first)" if lines else ""), logging.WARNING)


def _bindir_from_config(barman):
    for line in (barman.servers_dir / f"{barman.name}.conf").read_text().splitlines():
        if line.startswith("path_prefix = "):
            return Path(line.split(" = ", 1)[1].strip())
    raise DbdeckError(f"{barman.servers_dir}: no path_prefix; run `dbdeck pitr setup` again")


def _run_checks(pair, cluster, checks):
    results = []
    for check in checks:
        try:
            with cluster.connect(check.database) as conn:
                row = conn.execute(check.query).fetchone()
        except Exception as exc:  # noqa: BLE001 - any database error is this check's verdict
            raise DbdeckError(f"check {check.query!r} on {check.database} failed in the restored copy: "
                              f"{str(exc).splitlines()[0]}") from None
        value = row[0] if row else None
        try:
            passed = value is not None and float(value) >= check.min
        except (TypeError, ValueError):
            passed = value is not None
        if not passed:
            raise DbdeckError(f"check {check.query!r} on {check.database} returned {value!r} in the restored copy "
                              f"(expected at least {check.min:g})")
        pair.say(f"check on {check.database}: {check.query} -> {value}")
        results.append({"database": check.database, "query": check.query, "value": value})
    return results


def _record_verify(pair, barman, ok, summary, seconds, steps):
    now = output.timestamp()
    fields = {"at": now, "ok": ok, "summary": summary, "seconds": round(seconds, 1)}
    if ok:
        fields["last_success"] = now
    barman.state.update("last_verify", **fields)
    pair.app.record_result("pitr verify", "backup", ok, summary, round(seconds, 1), steps=steps)
    if not ok:
        pair.app.notify(Event("backup.verify_failed", summary, severity="critical"))


# --- maintenance and failover -----------------------------------------------------------------------------
def maintain(pair):
    """What `barman cron` does (receiver running, WAL archived, retention applied), the primary followed
    after a failover, and the pending base backup taken."""
    barman = Barman(pair)
    primary = _reachable_primary(pair)
    configured = barman.configured_host()
    if primary is not None and configured is not None and configured != primary.replication_address:
        follow_primary(pair, primary, barman)
    elif primary is not None and not pair.runner.dry_run:
        # a primary restored from a backup has no slots (pg_basebackup leaves them out): give it Barman's again
        with primary.connect() as conn, primary.endpoint.driver_errors("pitr maintain"):
            _ensure_barman_slot(pair, conn, primary.name)
    barman.start_receiver()
    streaming = False
    if primary is not None and not pair.runner.dry_run:
        streaming = _receiver_runs(pair, barman, primary)
        if not streaming:
            # its last position is not on the server's timeline any more (the primary was restored to an
            # earlier moment): start from the server's current position; the new base backup below covers the chain
            pair.say("Barman's WAL receiver cannot continue from its last position: restarting it from the "
                     "primary's current position", logging.WARNING)
            barman.run("receive-wal", "--reset", barman.name, check=False, timeout=60)
            barman.start_receiver()
            if not barman.state.entry("chain").get("pending_since"):
                barman.state.update("chain", pending_since=output.timestamp(), reason="WAL receiver reset")
            streaming = _receiver_runs(pair, barman, primary)
    if primary is not None and (barman.state.entry("chain").get("pending_since")):
        create(pair, barman)
    if not pair.runner.dry_run:
        barman.state.update("receiver", streaming=streaming, checked=output.timestamp(),
                            primary=primary.name if primary else None)
    return {"server": barman.name, "primary": primary.name if primary else None,
            "problems": backup_problems(barman)}


def _receiver_runs(pair, barman, primary):
    """pg_receivewal streams from the primary (checked a few times: it takes a moment to connect)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _receiver_streams(primary, barman):
            time.sleep(1)  # one that cannot continue exits at once: look again
            if _receiver_streams(primary, barman):
                return True
        time.sleep(0.5)
    return False


def _receiver_streams(primary, barman):
    """Barman's pg_receivewal holds its replication slot on the primary, i.e. it is connected and streaming.
    One query: `barman check` is a new process running a dozen checks, too dear to poll."""
    try:
        with primary.connect(timeout=3) as conn, primary.endpoint.driver_errors("Barman's slot"):
            row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                               (barman.settings.slot,)).fetchone()
    except DbdeckError:
        return False
    return bool(row and row[0])


def follow_primary(pair, primary, barman=None):
    """After a failover or switchover: Barman streams from the new primary (conninfo rewritten, slot created
    there, receiver restarted) and a new base backup is due, so that the WAL chain has no hole."""
    barman = barman or Barman(pair)
    if not barman.configured:
        return
    host, port = primary.replication_address
    pair.say(f"backups follow the new primary: Barman now streams from {primary.name} ({host}:{port})")
    if pair.runner.dry_run:
        pair.say("would rewrite Barman's conninfo, create its slot there, restart its WAL receiver and take a "
                 "new base backup")
        return
    barman.state.update("chain", pending_since=output.timestamp(), primary=primary.name,
                        reason=f"the role change to {primary.name}")
    with primary.connect() as conn, primary.endpoint.driver_errors("pitr follow"):
        _ensure_barman_slot(pair, conn, primary.name)
    barman.write_config(primary, _bindir_from_config(barman), read_password(pair))
    # no `receive-wal --reset`: pg_receivewal continues from the last position it has, through the timeline
    # switch, from the WAL the slot created before the promotion kept (reserve_for_backups)
    barman.stop_receiver()
    barman.start_receiver()
    barman.state.update("server", primary=primary.name)


def _set_up_barman(pair):
    if pair.settings.backup is None:
        return None
    barman = Barman(pair)
    return barman if barman.configured else None


def reserve_for_backups(pair, conn, where):
    """Barman's slot on the node behind conn, once backups are set up (never before: an unused slot would
    keep WAL forever)."""
    if _set_up_barman(pair) is not None:
        _ensure_barman_slot(pair, conn, where)


def after_role_change(pair, new_primary):
    """Called by promote-replica, switchover and auto-failover once the new primary takes writes. Quick and
    never failing them: the new base backup is left to `pitr maintain` (each minute) so a failover is not
    held up by a copy of the whole database. First, the record of which node is the primary (roles.py)."""
    from .roles import record_primary

    record_primary(pair, new_primary.name, "role change")
    try:
        barman = _set_up_barman(pair)
        if barman is None:
            return
        follow_primary(pair, new_primary, barman)
        pair.say("a base backup of the new primary is due: `dbdeck pitr maintain` (scheduled each minute) takes it")
    except DbdeckError as exc:
        pair.say(f"backups could not follow {new_primary.name} yet ({exc}); `dbdeck pitr maintain` (scheduled each "
                 f"minute) retries", logging.WARNING)
