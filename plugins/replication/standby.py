"""Turning a stopped node into a standby of another: follow (standby.signal + primary_conninfo), pg_rewind,
and fencing (a node that can only ever come back read-only).

The invariant every step here keeps, tested by killing dbdeck at each failpoint: a node that was fenced
can never start as a writable primary until it is a standby of the new primary. Its data directory
always either holds standby.signal or cannot start at all (no PG_VERSION: pg_rewind and pg_basebackup
work in a subdirectory, and files move back with standby.signal first and PG_VERSION last).
"""

import logging
import re
import secrets
import time

from dbdeck import faults
from dbdeck.errors import CommandFailed, DbdeckError

from . import synchronous
from .pgpass import pgpass_line
from .setup import ensure_slot as ensure_slot_on_connection, password_file, read_password

# The replication password is in a pgpass file that primary_conninfo names (passfile=), as Patroni does, never
# in the conninfo itself: PostgreSQL prints a changed primary_conninfo in its log on reload, and
# postgresql.auto.conf goes into every base backup of the node (a promoted standby's backups would carry
# each secret it ever had). The file is in pg_replslot/, whose contents pg_basebackup (so Barman) and
# pg_rewind leave out and where PostgreSQL takes only directories as slots. Its path is relative to the data
# directory, the WAL receiver's working directory, so it holds wherever dbdeck moves the files. Each write
# has a new name: the conninfo then changes, and a reload restarts the WAL receiver with the new password.
PASSFILE_PATTERN = "pg_replslot/dbdeck-replication-*.pgpass"

# $1 directory, $2 the passfile (relative to it); stdin: its pgpass line, then the primary_conninfo and
# primary_slot_name lines. default_transaction_read_only is dropped: switchover sets it to block writes on
# the old primary, and it must not follow the node into a later promotion; pg_rewind's temporary
# restore_command (marked) goes too. Older passfiles go once the conninfo names the new one.
_FOLLOW = r'''set -eu
data=$1; passfile=$2; conf="$data/postgresql.auto.conf"
IFS= read -r secret
mkdir -p "$data/pg_replslot"
(umask 077; printf '%s\n' "$secret" > "$data/$passfile.new")
mv "$data/$passfile.new" "$data/$passfile"
touch "$conf"
ours='^[[:space:]]*(primary_conninfo|primary_slot_name|default_transaction_read_only)[[:space:]]*='
grep -vE "$ours|# dbdeck-rewind$" "$conf" > "$conf.dbdeck" || true
cat >> "$conf.dbdeck"
chmod 600 "$conf.dbdeck"
mv "$conf.dbdeck" "$conf"
touch "$data/standby.signal"
for old in "$data"/pg_replslot/dbdeck-replication-*.pgpass; do
    [ "$old" = "$data/$passfile" ] || rm -f "$old"
done
'''

# Both moves below name the subdirectory in $data/.dbdeck-moving while they run: killed half-way, they
# leave the files split between the two places, and the next run moves that subdirectory back up
# (recover_interrupted), which reunites them whichever way the move was going.
_MARK_MOVE = ('''printf '%s\\n' "$2" > "$data/.dbdeck-moving.new"; '''
              '''mv "$data/.dbdeck-moving.new" "$data/.dbdeck-moving"''')

# $1 data directory, $2 the subdirectory to move everything into. PG_VERSION goes first: without it
# nothing starts on the data directory (pg_ctl, a container, a systemd unit), whatever else is still
# there; standby.signal goes last. A data directory that is a mount point stays one.
MOVE_ASIDE = r'''set -eu
data=$1; aside="$data/$2"
mkdir -p "$data"; chmod 700 "$data"
mkdir -m 700 "$aside"
''' + _MARK_MOVE + r'''
if [ -e "$data/PG_VERSION" ]; then mv "$data/PG_VERSION" "$aside/"; fi
for entry in "$data"/* "$data"/.[!.]* "$data"/..?*; do
    [ -e "$entry" ] || [ -L "$entry" ] || continue
    case "${entry##*/}" in .dbdeck-*|standby.signal) continue;; esac
    mv "$entry" "$aside/"
done
if [ -e "$data/standby.signal" ]; then mv "$data/standby.signal" "$aside/"; fi
rm -f "$data/.dbdeck-moving"
'''
# $1 data directory, $2 the subdirectory to move back up: standby.signal first, PG_VERSION last. A
# .dbdeck-* directory inside it came with a copy of the other node's files (pg_basebackup and pg_rewind
# copy what they find): it is that node's business, not this one's.
MOVE_UP = r'''set -eu
data=$1; aside="$data/$2"
''' + _MARK_MOVE + r'''
if [ -e "$aside/standby.signal" ]; then mv "$aside/standby.signal" "$data/"; fi
for entry in "$aside"/* "$aside"/.[!.]* "$aside"/..?*; do
    [ -e "$entry" ] || [ -L "$entry" ] || continue
    case "${entry##*/}" in
        PG_VERSION) continue;;
        .dbdeck-*) rm -rf "$entry"; continue;;
    esac
    mv "$entry" "$data/"
done
if [ -e "$aside/PG_VERSION" ]; then mv "$aside/PG_VERSION" "$data/"; fi
rmdir "$aside"
rm -f "$data/.dbdeck-moving"
'''
# $1 data directory: the subdirectories an interrupted rewind or rebuild left, newest first, each with
# whether it holds a data directory (PG_VERSION); then whether the data directory itself has one.
_LEFTOVERS = r'''data=$1
for dir in $(ls -1d "$data"/.dbdeck-* 2>/dev/null | sort -r); do
    if [ -e "$dir/PG_VERSION" ]; then echo "data ${dir##*/}"; else echo "other ${dir##*/}"; fi
done
if [ -e "$data/PG_VERSION" ]; then echo "current PG_VERSION"; fi
'''
# $1 work directory, $2 where its WAL segments are copied. pg_rewind completes an unclean shutdown with
# a single-user server (which refuses standby.signal) whose end-of-recovery checkpoint may recycle the
# very segments pg_rewind then reads: the copies are its restore_command (--restore-target-wal). The
# server is stopped (its processes gone), so a postmaster.pid left by a kill -9 is stale.
_SAVE_WAL = r'''set -eu
work=$1; saved=$2
mkdir -p "$saved"; chmod 700 "$saved"
for segment in "$work"/pg_wal/[0-9A-F]*; do
    [ -f "$segment" ] && cp -p "$segment" "$saved/"
done
rm -f "$work/standby.signal" "$work/recovery.signal" "$work/postmaster.pid"
printf "restore_command = 'cp \"%s/%%f\" \"%%p\"'  # dbdeck-rewind\n" "$saved" >> "$work/postgresql.auto.conf"
'''


class RewindImpossible(DbdeckError):
    """pg_rewind cannot bring this node back; the message says why (a base backup is the way out)."""


def _quote_conninfo(value):
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _quote_setting(value):
    return "'" + str(value).replace("'", "''") + "'"


def follow(pair, node, primary, directory=None):
    """Make the stopped `node` start as a standby streaming from `primary` (through the slot).
    `directory` is where its files are now (default: its data directory)."""
    password = read_password(pair)
    user = pair.settings.replication_user
    if "\n" in password or "\r" in password:
        raise DbdeckError(f"the replication password in {password_file(pair)} has a line break: a pgpass file "
                          f"cannot hold it (rotate-replication-password writes a new one)")
    passfile = PASSFILE_PATTERN.replace("*", secrets.token_hex(6))
    host, port = primary.replication_address
    conninfo = " ".join(f"{k}={_quote_conninfo(v)}" for k, v in (
        ("host", host), ("port", port), ("user", user), ("passfile", passfile), ("application_name", node.name)))
    lines = (pgpass_line("*", "*", user, password)
             + f"primary_conninfo = {_quote_setting(conninfo)}\n"
             + f"primary_slot_name = {_quote_setting(pair.settings.slot)}\n")
    pair.say(f"{node.name}: standby.signal + primary_conninfo -> {primary.name} ({host}:{port}), "
             f"slot {pair.settings.slot}, password in {passfile}")
    node.driver.shell(_FOLLOW, directory or node.driver.data_dir, passfile, stdin=lines, offline=True)


def ensure_slot(pair, primary):
    """The standby's slot on `primary` (a standby about to be promoted, too: reserved from its last
    restartpoint, it keeps the WAL from before the fork), and Barman's when backups are set up, so Barman's
    receiver continues from where it was and the WAL archive has no hole."""
    from .backup import reserve_for_backups

    with primary.connect() as conn, primary.endpoint.driver_errors("slot"):
        in_use = ensure_slot_on_connection(pair, conn, primary.name)
        reserve_for_backups(pair, conn, primary.name)
        return in_use


def stop_node(pair, node, mode="fast"):
    try:
        node.driver.stop(mode, timeout=60)
    except DbdeckError as exc:
        pair.say(f"{node.name}: {mode} shutdown failed ({exc}); stopping immediately", logging.WARNING)
        node.driver.stop("immediate", timeout=30)
    if not pair.runner.dry_run:
        pair.wait_for(lambda: not node.driver.is_running(), f"{node.name} to stop", timeout=60)


def drop_own_slot(pair, node, directory=None):
    """A node becoming a standby keeps no slot of its own from its days as a primary: on a standby an
    inactive slot would hold its WAL forever. Offline only (the directory of a stopped server)."""
    node.driver.shell('rm -rf "$1/pg_replslot/$2"', directory or node.driver.data_dir, pair.settings.slot,
                      offline=True)


def fence(pair, node, new_primary):
    """Make `node` unable to come back as a writable primary. standby.signal is written *before* the
    stop, so whatever restarts it (a restart policy, an operator, a reboot) gets a standby; the stop is
    immediate, so no shutdown checkpoint recycles the WAL pg_rewind needs later."""
    pair.say(f"fencing {node.name}: standby.signal, then stop it (it can restart only as a standby of "
             f"{new_primary.name})")
    if node.config.driver == "docker":
        pair.runner.run(["docker", "update", "--restart=no", node.driver.container], check=False)
    faults.point("fence.restart-policy")
    follow(pair, node, new_primary)
    faults.point("fence.signal-written")
    stop_node(pair, node, "immediate")
    faults.point("fence.stopped")
    drop_own_slot(pair, node)


def _saved_config(pair, node, directory):
    """The node's own config files, read before pg_rewind copies the source's over them."""
    saved = {}
    for name in pair.settings.keep_config_files:
        result = node.driver.shell('cat "$1/$2" 2>/dev/null || true', directory, name, offline=True,
                                   read_only=True)
        if result.stdout:
            saved[name] = result.stdout
    return saved


# $1 directory; stdin: the node's own settings. They go to dbdeck-node.conf, included last from
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


def apply_node_settings(node, directory=None):
    """Write the node's `settings:` into its stopped data directory (or where its files are now)."""
    text = "".join(setting_line(k, v) for k, v in node.config.settings.items())
    node.driver.shell(_APPLY_NODE_SETTINGS, directory or node.driver.data_dir, stdin=text, offline=True)


def recover_interrupted(pair, node):
    """Put back a data directory that a killed rewind or rebuild left in a subdirectory (with standby.signal:
    the caller makes it follow the primary next), and drop the copies nobody needs any more."""
    data = node.driver.data_dir
    _reunite_split_move(pair, node)
    output = node.driver.shell(_LEFTOVERS, data, offline=True, read_only=True).stdout
    entries = [line.split(" ", 1) for line in output.splitlines() if " " in line]
    has_current = ["current", "PG_VERSION"] in entries
    for kind, name in entries:
        if kind == "current":
            continue
        if not has_current and kind == "data" and name.startswith((".dbdeck-rewind-", ".dbdeck-old-")):
            pair.say(f"{node.name}: an interrupted run left its data directory in {data}/{name}; moving it back "
                     f"(with standby.signal first)", logging.WARNING)
            node.driver.shell('touch "$1/$2/standby.signal"', data, name, offline=True)
            node.driver.shell(MOVE_UP, data, name, offline=True)
            has_current = True
        elif name.startswith((".dbdeck-wal-", ".dbdeck-new-")) or (kind == "other"
                                                                  and name.startswith(".dbdeck-rewind-")):
            node.driver.shell('rm -rf "$1/$2"', data, name, offline=True)
        elif kind == "data":
            pair.say(f"{node.name}: {data}/{name} is a copy an earlier run kept; delete it once you are sure you "
                     f"do not need it", logging.WARNING)


def _reunite_split_move(pair, node):
    """A move between the data directory and one of its subdirectories that was killed half-way: finish
    it upwards (an interrupted move aside is undone, an interrupted move up completed; either way every
    file is in exactly one of the two places, so nothing collides and nothing is lost)."""
    data = node.driver.data_dir
    marked = node.driver.shell('cat "$1/.dbdeck-moving" 2>/dev/null || true', data, offline=True,
                               read_only=True).stdout.strip()
    if not re.fullmatch(r"\.dbdeck-[A-Za-z0-9_-]+", marked or ""):
        return
    present = node.driver.shell('test -d "$1/$2" && echo yes || true', data, marked, offline=True,
                                read_only=True).stdout.strip() == "yes"
    if present:
        pair.say(f"{node.name}: a run killed while moving files between {data} and {data}/{marked} left them "
                 f"split; moving them all into {data}", logging.WARNING)
        node.driver.shell(MOVE_UP, data, marked, offline=True)
    node.driver.shell('rm -f "$1/.dbdeck-moving"', data, offline=True)


def rewind(pair, node, source):
    """pg_rewind the stopped `node` onto `source`, then make it follow `source`. Raises RewindImpossible
    with pg_rewind's own reason when it cannot; the node is then left fenced (standby.signal)."""
    data = node.driver.data_dir
    stamp = time.strftime("%Y%m%d%H%M%S")
    work_name, wal_name = f".dbdeck-rewind-{stamp}", f".dbdeck-wal-{stamp}"
    work, saved_wal = f"{data}/{work_name}", f"{data}/{wal_name}"
    has_conf = node.driver.shell('test -f "$1/postgresql.conf" && echo yes || true', data, offline=True,
                                 read_only=True).stdout.strip()
    if has_conf != "yes" and not pair.runner.dry_run:
        raise RewindImpossible(f"{data} has no postgresql.conf (the configuration lives elsewhere), so pg_rewind "
                               f"cannot run its crash recovery on a copy")
    admin = source.endpoint
    host, port = source.replication_address
    conninfo = " ".join(f"{k}={_quote_conninfo(v)}" for k, v in (
        ("host", host), ("port", port), ("user", admin.user or "postgres"), ("dbname", admin.database or "postgres")))
    env = {"PGPASSWORD": admin.password} if admin.password else {}
    pair.say(f"pg_rewind {node.name} onto {source.name} (in {work}, where no server can start from)")
    # a fresh primary writes its new timeline to pg_control only at the end-of-recovery checkpoint, which
    # promotion no longer waits for; without it pg_rewind sees one timeline and says "no rewind required"
    if not pair.runner.dry_run:
        with source.connect() as conn, source.endpoint.driver_errors("CHECKPOINT"):
            conn.execute("CHECKPOINT")
    node.driver.shell(MOVE_ASIDE, data, work_name, offline=True)
    faults.point("rewind.moved-aside")
    try:
        saved = _saved_config(pair, node, work)
        drop_own_slot(pair, node, work)
        node.driver.shell(_SAVE_WAL, work, saved_wal, offline=True)
        faults.point("rewind.wal-saved")
        try:
            result = node.driver.shell('exec "$@"', node.driver.tool("pg_rewind"), "-D", work,
                                       f"--source-server={conninfo}", "--restore-target-wal", "--progress",
                                       env=env, offline=True, timeout=6 * 3600)
        except CommandFailed as exc:
            raise RewindImpossible(f"pg_rewind failed: {rewind_reason(exc)}") from None
        faults.point("rewind.rewound")
        _check_source_keeps_wal(pair, source, result.stderr)
        for name, text in saved.items():
            node.driver.shell('cat > "$1/$2"', work, name, stdin=text, offline=True)
        apply_node_settings(node, work)
        follow(pair, node, source, work)
        faults.point("rewind.configured")
    except BaseException:
        # whatever happened, the files go back fenced: a standby of the new primary, never a writable one
        try:
            node.driver.shell('touch "$1/standby.signal"', work, offline=True)
            node.driver.shell(MOVE_UP, data, work_name, offline=True)
            node.driver.shell('rm -rf "$1"', saved_wal, offline=True)
        except DbdeckError as exc:
            pair.say(f"could not move {work} back ({exc}); the node cannot start until it is", logging.ERROR)
        raise
    node.driver.shell(MOVE_UP, data, work_name, offline=True)
    faults.point("rewind.moved-back")
    node.driver.shell('rm -rf "$1"', saved_wal, offline=True)


def _copied_but_never_started(node):
    """pg_rewind and pg_basebackup leave backup_label; the first start's recovery removes it."""
    result = node.driver.shell('test -e "$1/PG_VERSION" && test -e "$1/backup_label" && echo yes || true',
                               node.driver.data_dir, offline=True, read_only=True)
    return result.stdout.strip() == "yes"


def _check_source_keeps_wal(pair, source, rewind_output):
    """After the rewind the node streams the new timeline from the fork on: when the source no longer has
    that WAL (a failed copy advanced the slot, checkpoints recycled it), the node could only wait forever."""
    match = re.search(r"servers diverged at WAL location ([0-9A-F]+)/([0-9A-F]+)", rewind_output or "")
    if pair.runner.dry_run or not match:
        return
    with source.connect() as conn, source.endpoint.driver_errors("pg_ls_waldir"):
        oldest, segment_size = conn.execute(
            "SELECT min(substr(name, 9)), (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size') "
            "FROM pg_ls_waldir() "
            "WHERE name ~ '^[0-9A-F]{24}$'").fetchone()
    needed = f"{int(match.group(1), 16):08X}{int(match.group(2), 16) // segment_size:08X}"
    if oldest and oldest > needed:
        raise RewindImpossible(f"{source.name} no longer has the WAL from the fork at {match.group(1)}/"
                               f"{match.group(2)} that the rewound files must stream (its oldest segment is "
                               f"…{oldest})")


def rewind_reason(exc):
    """pg_rewind's own explanation (its error/detail lines), not just 'exit status 1'."""
    lines = [line.strip() for line in (exc.stderr or "").splitlines() if line.strip()]
    wanted = [line.split("pg_rewind: ", 1)[-1] for line in lines
              if line.startswith("pg_rewind: error:") or line.startswith("pg_rewind: detail:")
              or line.startswith("pg_rewind: hint:") or " FATAL: " in line]
    if wanted:
        return "; ".join(wanted)
    return lines[-1] if lines else str(exc).splitlines()[0]


def checkpoint_lsn(pair, node):
    """(cluster state, latest checkpoint location) of the stopped node, from pg_controldata."""
    result = node.driver.shell('exec "$@"', node.driver.tool("pg_controldata"), "-D", node.driver.data_dir,
                               offline=True, read_only=True, env={"LC_ALL": "C"})
    state = re.search(r"^Database cluster state:\s*(.+)$", result.stdout, re.M)
    location = re.search(r"^Latest checkpoint location:\s*(\S+)$", result.stdout, re.M)
    if not (state and location):
        raise DbdeckError(f"cannot read pg_controldata of {node.name}")
    return state.group(1).strip(), location.group(1)


def _stop_for_rewind(pair, node):
    """A primary stops immediately (a shutdown checkpoint would recycle WAL pg_rewind needs); a standby
    stops cleanly ('shut down in recovery' needs no crash recovery). pg_rewind's own crash recovery runs
    without standby.signal, which is right for a primary's files only: a standby that stopped uncleanly
    first finishes its recovery as a standby."""
    from .cluster import probe_node

    state = probe_node(node, 3)
    stop_node(pair, node, "fast" if state.reachable and state.in_recovery else "immediate")
    recover_interrupted(pair, node)
    if pair.runner.dry_run or not _has_data(node):
        return
    if checkpoint_lsn(pair, node)[0] == "in archive recovery":
        pair.say(f"{node.name} stopped uncleanly as a standby: letting it finish recovery as one, then a clean stop")
        node.driver.shell('touch "$1/standby.signal"', node.driver.data_dir, offline=True)
        node.driver.start()
        stop_node(pair, node, "fast")


def _has_data(node):
    result = node.driver.shell('test -e "$1/PG_VERSION" && echo yes || true', node.driver.data_dir, offline=True,
                               read_only=True)
    return result.stdout.strip() == "yes"


def rejoin(pair, node, primary):
    """Bring `node` back as a standby of `primary`: pg_rewind when possible, else a fresh base backup.
    Returns 'rewind' or 'basebackup'."""
    ensure_slot(pair, primary)
    try:
        _stop_for_rewind(pair, node)
        if not pair.runner.dry_run and _copied_but_never_started(node):
            # a rejoin killed after pg_rewind (or a rebuild after its copy): the files are complete and
            # must now recover from the new primary; a second pg_rewind over them would corrupt them
            pair.say(f"{node.name} holds a finished copy that never started (backup_label): completing the "
                     f"earlier rejoin instead of rewinding again", logging.WARNING)
            apply_node_settings(node)
            follow(pair, node, primary)
        else:
            rewind(pair, node, primary)
        node.driver.start()
        if pair.runner.dry_run:
            return "rewind"
        pair.wait_for(lambda: pair.is_streaming(node, primary), f"{node.name} to stream from {primary.name}",
                      timeout=min(60, pair.settings.wait_timeout))
        pair.say(f"{node.name} rejoined as a standby of {primary.name} (pg_rewind)")
        synchronous.standby_streams(pair, primary)
        return "rewind"
    except DbdeckError as exc:
        pair.say(f"pg_rewind cannot rejoin {node.name}: {exc}; falling back to a fresh base backup",
                 logging.WARNING)
    from .rebuild import rebuild_replica  # rebuild uses this module's helpers

    rebuild_replica(pair, node.name)
    return "basebackup"
