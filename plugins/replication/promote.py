"""promote-replica: the seed's emergency failover, refusing to create a second primary."""

import logging
import os
import re
from urllib.parse import urlsplit, urlunsplit

from dbdeck.errors import DbdeckError, Refused
from dbdeck.events import Event
from dbdeck.state import write_atomic

from . import synchronous


def promote_replica(pair, node_name=None, force=False, update_connections=False, fence=False):
    snapshot = pair.probe()
    standbys = [n for n in snapshot.nodes if n.reachable and n.in_recovery]
    if node_name:
        pair.node(node_name)
        chosen = [n for n in standbys if n.name == node_name]
        if not chosen:
            state = snapshot.node(node_name)
            raise Refused(f"{node_name} is not a reachable standby ({state.role}"
                          f"{': ' + state.error if state.error else ''})")
    else:
        chosen = standbys
        if not chosen:
            raise DbdeckError("no reachable standby to promote: " + ", ".join(
                f"{n.name}: {n.role}" for n in snapshot.nodes))
        if len(chosen) > 1:
            raise DbdeckError("several standbys answer; choose one with --node")
    standby_state = chosen[0]
    standby = pair.node(standby_state.name)
    old_primaries = [n for n in pair.nodes if n.name != standby.name]

    live = [n for n in snapshot.primaries]
    if live and fence:
        from .standby import stop_node

        for state in live:
            pair.say(f"fencing {state.name}: it accepts writes, {standby.name} takes over; stopping it",
                     logging.WARNING)
            stop_node(pair, pair.node(state.name), "fast")
        live = []
    if live and not force:
        raise Refused(f"primary {', '.join(n.name for n in live)} still answers and accepts writes: promoting "
                      f"{standby.name} now would make two writable primaries (split-brain). Stop the primary "
                      f"first, use switchover for a planned swap, or --force if you know the apps cannot reach it")
    refusing = [n for n in snapshot.nodes if n.name != standby.name and not n.reachable and n.responded]
    if refusing and not force:
        node = refusing[0]
        raise Refused(f"{node.name} answers but refuses dbdeck's connection ({node.error}): it may still be a "
                      f"primary taking the applications' writes. Fix its credentials in the config or stop it; "
                      f"--force promotes anyway")
    if live:
        for node in live:
            pair.say(f"WARNING: --force: {node.name} STILL ACCEPTS WRITES. After this promotion there are TWO "
                     f"PRIMARIES; writes that reach {node.name} will be lost. Stop it now.", logging.WARNING)
    for node in old_primaries:
        if node.name not in {n.name for n in live}:
            try:
                if node.driver.is_running():
                    pair.say(f"WARNING: {node.name} does not answer but its server ({node.driver.describe()}) is "
                             f"still running: stop it before the applications reconnect", logging.WARNING)
            except DbdeckError:
                pass

    pair.say(f"standby {standby.name}: last received {standby_state.receive_lsn}, last replayed "
             f"{standby_state.replay_lsn}" + (f", last replayed commit {standby_state.replay_age_seconds:.1f}s ago"
                                              if standby_state.replay_age_seconds is not None else ""))
    if pair.runner.dry_run:
        pair.say(f"would execute on {standby.name}: SELECT pg_promote(wait => true, wait_seconds => "
                 f"{pair.settings.wait_timeout})")
    else:
        from .standby import ensure_slot

        # reserved before the promotion: it keeps the WAL the old primary's rejoin replays (from before the fork)
        ensure_slot(pair, standby)
        synchronous.primary_alone(pair, standby)  # alone once promoted: commits must not wait for a standby
        with standby.connect() as conn, standby.endpoint.driver_errors("pg_promote"):
            done = conn.execute("SELECT pg_promote(true, %s)", (pair.settings.wait_timeout,)).fetchone()[0]
        if not done:
            raise DbdeckError(f"pg_promote() on {standby.name} did not finish within {pair.settings.wait_timeout}s")
        pair.wait_for(lambda: pair.accepts_writes(standby), f"{standby.name} to accept writes")
        pair.say(f"{standby.name} is the primary now and accepts writes")
        pair.app.notify(Event("failover.promoted", f"{standby.name} promoted to primary", severity="warning",
                              details={"node": standby.name, "forced": bool(live)}))
        from .backup import after_role_change

        after_role_change(pair, standby)

    old = next((n for n in old_primaries), None)
    changes = connection_changes(pair, old, standby)
    for line in changes:
        pair.say(line)
    if update_connections:
        update_env_files(pair, old, standby)
        restart_services(pair)
    elif pair.settings.after_promote.env_files or pair.settings.after_promote.restart_services:
        pair.say("rerun with --update-connections to make these changes, or make them by hand")
    pair.say(f"afterwards: rebuild-replica --rejoin --node {old.name} turns {old.name} into a standby of "
             f"{standby.name} (pg_rewind, a full copy only if that cannot work)"
             if old else "afterwards: add a new standby with rebuild-replica")
    return standby


def connection_changes(pair, old, new):
    after = pair.settings.after_promote
    lines = ["next: point the applications at the new primary"]
    if old and old.app_address and new.app_address:
        lines.append(f"  {after.variable}: host {old.app_address} -> {new.app_address}")
    for file in after.env_files:
        lines.append(f"  edit {file}")
    if after.restart_services:
        compose = " ".join(compose_command(pair, dry=True))
        lines.append(f"  restart: {compose} restart {' '.join(after.restart_services)}")
    return lines


def rewrite_url(value, old_address, new_address):
    """The URL with its host:port changed when it points at old_address; None when it does not."""
    parts = urlsplit(value)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    if hostport != old_address:
        return None
    netloc = f"{userinfo}@{new_address}" if userinfo else new_address
    return urlunsplit(parts._replace(netloc=netloc))


def update_env_files(pair, old, new):
    after = pair.settings.after_promote
    if not after.env_files:
        return
    if not (old and old.app_address and new.app_address):
        raise DbdeckError("set app_address: on both nodes so promote-replica knows what to rewrite")
    pattern = re.compile(rf"^(?P<head>\s*(?:export\s+)?{re.escape(after.variable)}\s*=\s*)(?P<q>['\"]?)"
                         rf"(?P<url>[^'\"\s#]*)(?P=q)(?P<tail>.*)$")
    for path in after.env_files:
        try:
            text = path.read_text()
        except OSError as exc:
            raise DbdeckError(f"cannot read {path}: {exc.strerror}") from None
        changed, lines = 0, []
        for line in text.splitlines(keepends=True):
            match = pattern.match(line.rstrip("\n"))
            new_url = rewrite_url(match["url"], old.app_address, new.app_address) if match else None
            if new_url is not None:
                line = f"{match['head']}{match['q']}{new_url}{match['q']}{match['tail']}\n"
                changed += 1
            lines.append(line)
        if not changed:
            pair.say(f"{path}: no {after.variable} pointing at {old.app_address}; left unchanged", logging.WARNING)
            continue
        if pair.runner.dry_run:
            pair.say(f"would rewrite {after.variable} in {path} ({changed} line(s)): {old.app_address} -> "
                     f"{new.app_address}")
            continue
        write_atomic(path, "".join(lines), mode=os.stat(path).st_mode & 0o777)
        pair.say(f"{path}: {after.variable} now points at {new.app_address}")


def compose_command(pair, dry=False):
    """`docker compose` when the v2 plugin is there, else `docker-compose` (v1)."""
    after = pair.settings.after_promote
    files = ["-f", str(after.compose_file)] if after.compose_file else []
    if after.compose_project:
        files += ["-p", after.compose_project]
    if dry:
        return ["docker", "compose", *files]
    probe = pair.runner.run(["docker", "compose", "version"], check=False, read_only=True)
    return ["docker", "compose", *files] if probe.returncode == 0 else ["docker-compose", *files]


def restart_services(pair):
    services = pair.settings.after_promote.restart_services
    if services:
        pair.runner.run([*compose_command(pair), "restart", *services], timeout=600)
        pair.say(f"restarted {', '.join(services)}")
