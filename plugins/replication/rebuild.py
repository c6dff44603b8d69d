"""rebuild-replica: a fresh standby from the current primary, keeping the old data until it streams.

The data directory is rebuilt in place (works when it is a volume's mount point, as in the seed's
containers): its contents move into <data>/.dbdeck-old-STAMP, pg_basebackup writes
<data>/.dbdeck-new-STAMP, and only then the new files move up (standby.signal first, PG_VERSION last). A
failure before the server starts puts the old files back, fenced as a standby of the primary; the old copy
is deleted only once the new standby streams.
"""

import logging
import sys
import time

from dbdeck import faults
from dbdeck.errors import DbdeckError, Refused
from dbdeck.events import Event

from . import synchronous
from .cluster import split_brain_advice
from .roles import recorded_primary
from .setup import read_password
from .standby import MOVE_ASIDE, MOVE_UP, apply_node_settings, ensure_slot, follow, recover_interrupted

# $1 data, $2 stamp, $3... config files to carry over from the old copy (the node's own, not the primary's).
_CARRY_CONFIG = r'''set -eu
data=$1; old="$data/.dbdeck-old-$2"; new="$data/.dbdeck-new-$2"; shift 2
for file in "$@"; do if [ -f "$old/$file" ]; then cp -p "$old/$file" "$new/$file"; fi; done
'''
# $1 data: what a failed copy left in the data directory goes, PG_VERSION first.
_CLEAR = r'''set -eu
data=$1
rm -f "$data/PG_VERSION"
for entry in "$data"/* "$data"/.[!.]* "$data"/..?*; do
    [ -e "$entry" ] || [ -L "$entry" ] || continue
    case "${entry##*/}" in .dbdeck-old-*) continue;; esac
    rm -rf "$entry"
done
'''
_DROP_OLD = 'rm -rf "$1/.dbdeck-old-$2"'


def choose_target(pair, snapshot, node_name):
    """(target node, primary node) for a rebuild, refusing to touch the only writable copy."""
    primaries = snapshot.primaries
    if node_name:
        target = pair.node(node_name)
        sources = [p for p in primaries if p.name != target.name]
        if not sources:
            if any(p.name == target.name for p in primaries):
                raise Refused(f"{target.name} is the only primary: rebuilding it would destroy the only writable "
                              f"copy; promote the standby first (promote-replica)")
            raise DbdeckError("no reachable primary to copy from: " + _roles(snapshot))
        if len(sources) > 1:
            raise DbdeckError("more than one other primary; cannot tell which to copy from: " + _roles(snapshot))
        return target, pair.node(sources[0].name)
    if len(primaries) > 1:
        advice = split_brain_advice(primaries, recorded_primary(pair))
        raise Refused(f"split-brain: {advice}. Choose the node to throw away with --node")
    if not primaries:
        raise DbdeckError("no reachable primary to copy from: " + _roles(snapshot))
    others = [n for n in pair.nodes if n.name != primaries[0].name]
    if len(others) > 1:
        raise DbdeckError("several standbys are configured: choose one with --node")
    return others[0], pair.node(primaries[0].name)


def _roles(snapshot):
    return ", ".join(f"{n.name}: {n.role}" for n in snapshot.nodes)


def rebuild_replica(pair, node_name=None):
    settings = pair.settings
    snapshot = pair.probe()
    target, primary = choose_target(pair, snapshot, node_name)
    password = read_password(pair)
    host, port = primary.replication_address
    driver = target.driver
    data = driver.data_dir
    stamp = time.strftime("%Y%m%d%H%M%S") + f"{time.time() % 1:.3f}"[1:].replace(".", "")
    pair.say(f"rebuilding {target.name} ({driver.describe()}) as a standby of {primary.name} "
             f"(streaming from {host}:{port} as {settings.replication_user}, slot {settings.slot})")

    if ensure_slot(pair, primary):
        if target.name not in {s.name for s in snapshot.standbys if s.state}:
            raise Refused(f"slot {settings.slot} on {primary.name} is in use by another standby; give this one "
                          f"its own replication.slot")
        pair.say(f"slot {settings.slot} is in use by {target.name}; it is released when {target.name} stops")

    was_running = driver.is_running()
    pair.say(f"stopping {target.name}")
    try:
        driver.stop("fast", timeout=60)
    except DbdeckError as exc:
        pair.say(f"fast shutdown failed ({exc}); stopping immediately", logging.WARNING)
        driver.stop("immediate", timeout=30)
    if not pair.runner.dry_run:
        pair.wait_for(lambda: not driver.is_running(), f"{target.name} to stop", timeout=60)
    recover_interrupted(pair, target)

    old_name, new_name = f".dbdeck-old-{stamp}", f".dbdeck-new-{stamp}"
    pair.say(f"moving {data} aside to {data}/{old_name} (deleted only after the new standby streams)")
    driver.shell(MOVE_ASIDE, data, old_name, offline=True)
    faults.point("basebackup.moved-aside")
    new = f"{data}/{new_name}"
    try:
        progress = sys.stderr.isatty()
        pair.say(f"pg_basebackup from {primary.name} into {new}")
        driver.shell('exec "$@"', driver.tool("pg_basebackup"), "-h", host, "-p", port,
                     "-U", settings.replication_user, "-D", new, "-X", "stream", "-c", "fast",
                     "-S", settings.slot, "--no-password", *(["-P"] if progress else []),
                     env={"PGPASSWORD": password}, offline=True, timeout=24 * 3600, passthrough=progress)
        faults.point("basebackup.copied")
        driver.shell(_CARRY_CONFIG, data, stamp, *settings.keep_config_files, offline=True)
        apply_node_settings(target, new)
        # not pg_basebackup -R: it would write the password into primary_conninfo
        follow(pair, target, primary, new)
        driver.shell(MOVE_UP, data, new_name, offline=True)
        faults.point("basebackup.moved-in")
    except BaseException as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        reason = " / ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else type(exc).__name__
        pair.say(f"rebuild failed before {target.name} started ({reason}): putting the old data directory back "
                 f"(as a standby of {primary.name})", logging.ERROR)
        try:
            _put_back(pair, target, primary, data, old_name, new)
        except DbdeckError as exc:
            pair.say(f"could not put the old data back ({exc}); it is in {data}/{old_name}", logging.ERROR)
            raise
        if was_running:
            pair.say(f"starting {target.name} again on its old data")
            driver.start()
        raise

    pair.say(f"starting {target.name}")
    driver.start()
    if pair.runner.dry_run:
        pair.say(f"would wait until {target.name} streams from {primary.name}, then delete the old data")
        return target, primary
    try:
        pair.wait_for(lambda: pair.is_streaming(target, primary), f"{target.name} to stream from {primary.name}")
    except DbdeckError as exc:
        raise DbdeckError(f"{exc}; the previous data directory is kept in {data}/{old_name}") from None
    driver.shell(_DROP_OLD, data, stamp, offline=False)
    pair.say(f"{target.name} is streaming from {primary.name}; old data deleted")
    synchronous.standby_streams(pair, primary)
    pair.app.notify(Event("rebuild.done", f"{target.name} rebuilt by base backup from {primary.name}",
                          details={"node": target.name, "primary": primary.name}))
    return target, primary


def _put_back(pair, target, primary, data, old_name, new):
    """The old files back in place, fenced: whatever they were, they start only as a standby of primary."""
    driver = target.driver
    driver.shell('rm -rf "$1"', new, offline=True)
    faults.point("restore.new-removed")
    driver.shell(_CLEAR, data, offline=True)
    # a standby keeps its own primary_conninfo; anything else gets one (and standby.signal) first
    state = driver.shell('test -e "$1/PG_VERSION" || { echo empty; exit 0; }; test -e "$1/standby.signal" && '
                         'echo standby || echo primary', f"{data}/{old_name}", offline=True, read_only=True)
    if state.stdout.strip() == "primary" and not pair.runner.dry_run:
        follow(pair, target, primary, f"{data}/{old_name}")
    faults.point("restore.fenced")
    driver.shell(MOVE_UP, data, old_name, offline=True)
    faults.point("restore.moved-back")
