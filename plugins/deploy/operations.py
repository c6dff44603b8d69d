"""The deploy plugin's smaller commands: rollback, status, lock, backup list/create/restore."""

import json
import secrets as random_tokens
import sys
import time
from contextlib import contextmanager

from dbdeck.errors import DbdeckError, EXIT_FAILED
from dbdeck.events import Event

from .deploy import DeployFailed, Hooks, hook_variables, open_server, resolve, roll_back_to, valid_version
from .server import describe_holder, iso_now, who


@contextmanager
def _server(app, environment, reads_only=False):
    context = resolve(app, environment)
    server = open_server(context, probe_in_dry_run=reads_only)
    try:
        yield context, server
    finally:
        server.target.close()


@contextmanager
def _locked(server, what):
    token = random_tokens.token_hex(8)
    server.acquire_lock(what, token)
    try:
        yield
    finally:
        server.release_lock(token)


def rollback_command(app, environment, version):
    version = valid_version(version) if version else None
    with _server(app, environment) as (context, server):
        with _locked(server, f"rollback to {version or 'previous'}"):
            state = server.read_state()
            current = state.get("current")
            target = version or _previous_version(state, current)
            if target is None and not app.dry_run:
                raise DbdeckError(f"no earlier version of {environment} is kept to roll back to "
                                  f"(current: {current or 'unknown'})")
            target = target or "<previous version>"
            context.say(f"Rolling back {environment} from {current or '?'} to {target}...")
            context.say("Note: the database is not rolled back; restore a backup for that (backup list)")
            healthy = roll_back_to(context, server, target, state)
            outcome = "rolled_back" if healthy else "rollback_unhealthy"
            server.append_audit(app.config.section("deploy").audit_log, {
                "at": iso_now(), "environment": environment, "version": target, "previous": current,
                "outcome": f"manual_{outcome}", "by": who()})
            Hooks(context.profile.hooks_dir, context.runner).run(
                "post-rollback", hook_variables(context, target, current, outcome, "manual rollback"),
                must_succeed=False)
            app.notify(Event("deploy.rolled_back", f"{environment}: rolled back by hand from {current} to {target}",
                             severity="warning", details={"environment": environment, "version": target,
                                                          "previous": current, "healthy": healthy}))
            if not healthy:
                raise DeployFailed(f"rolled back to {target}, but it is not healthy")


def _previous_version(state, current):
    """What served before the current version (recorded when it was deployed: the same version the
    automatic rollback returns to), else the next older one kept."""
    history = state.get("history", [])
    versions = [h["version"] for h in history]
    entry = next((h for h in history if h.get("version") == current), None)
    if entry and entry.get("previous") in versions and entry["previous"] != current:
        return entry["previous"]
    if current in versions:
        older = versions[versions.index(current) + 1:]
        return older[0] if older else None
    return versions[0] if versions else None


def status_command(app, environment):
    with _server(app, environment, reads_only=True) as (context, server):
        state = server.read_state()
        tags = set(server.tags())
        container, exit_code = server.container_state()
        running_image = server.container_image_id()
        audit = server.sh(f"tail -n 5 {app.config.section('deploy').audit_log} 2>/dev/null || true",
                          read_only=True).stdout
        data = {
            "environment": environment, "server": server.target.describe(), "image": server.image(),
            "current": state.get("current"), "container": {"name": context.profile.container, "state": container,
                                                           "image_id": running_image},
            "kept_versions": [dict(h, kept=h["version"] in tags) for h in state.get("history", [])],
            "lock": server.lock_holder(),
            "recent": [json.loads(line) for line in audit.splitlines() if line.startswith("{")],
        }

        def text():
            lines = [f"{environment} on {data['server']}",
                     f"  current version: {data['current'] or 'unknown (never deployed by dbdeck)'}",
                     f"  container {context.profile.container}: {container}"
                     + (f" (exit status {exit_code})" if container == "exited" else "")]
            kept = [h for h in data["kept_versions"] if h["kept"]]
            lines.append("  versions kept for rollback: " + (", ".join(
                f"{h['version']}{' (current)' if h['version'] == data['current'] else ''}" for h in kept) or "none"))
            lines.append("  deploy lock: " + (describe_holder(data["lock"]) if data["lock"] else "free"))
            for entry in data["recent"]:
                lines.append(f"  {entry.get('at')} {entry.get('outcome'):<18} {entry.get('version')}"
                             f"  {entry.get('detail') or ''}".rstrip())
            return "\n".join(lines)

        app.emit(data, text)


def lock_command(app, environment, action, reason=None):
    with _server(app, environment, reads_only=action == "status") as (context, server):
        if action == "acquire":
            token = random_tokens.token_hex(8)
            server.acquire_lock("manual", token, message=reason)
            app.emit({"locked": True, "environment": environment, "by": who(), "message": reason},
                     f"deploy lock on {server.target.describe()} taken by {who()}; release it with: "
                     f"deploy lock release --env {environment}")
        elif action == "release":
            previous = server.release_lock()
            app.emit({"released": bool(previous.strip()), "holder": previous.strip() or None},
                     f"released the deploy lock held by {describe_holder(previous)}" if previous.strip()
                     else "the deploy lock was not held")
        else:
            holder = server.lock_holder()
            app.emit({"locked": holder is not None, "holder": holder},
                     f"held by {describe_holder(holder)}" if holder is not None else "free")
            if holder is not None:
                sys.exit(EXIT_FAILED)


def backup_list_command(app, environment):
    with _server(app, environment, reads_only=True) as (context, server):
        rows = server.backups()
        app.emit(rows, lambda: "\n".join(f"{row['name']:<36} {row['bytes']:>14,} bytes  {row['mode']}"
                                         for row in rows) or "no backups")


def backup_create_command(app, environment):
    with _server(app, environment) as (context, server):
        with _locked(server, "backup"):
            started = time.monotonic()
            path = server.create_backup(prefix="manual")
            removed = server.prune_backups(context.profile.backups_keep, prefix="manual")
            app.record_result(f"backup {environment}", "backup", True, f"wrote {path}",
                              round(time.monotonic() - started, 1), file=path)
            app.emit({"file": path, "removed": removed},
                     f"backup written: {path}" + (f" (removed {', '.join(removed)})" if removed else ""))


def backup_restore_command(app, environment, name, safety_backup=True):
    from .server import backup_path

    path = backup_path(name)
    with _server(app, environment) as (context, server):
        if not app.dry_run and not server.backup_exists(path):
            raise DbdeckError(f"{path} does not exist on {server.target.describe()} (see: backup list --env "
                              f"{environment})")
        with _locked(server, f"restore {path}"):
            if safety_backup:
                context.say("Backing up the current database first...")
                saved = server.create_backup(prefix="pre-restore")
                server.prune_backups(context.profile.backups_keep, prefix="pre-restore")
                context.say(f"current database saved to {saved}")
            started = time.monotonic()
            context.say(f"Restoring {path} into {context.profile.database.name} (one transaction)...")
            server.restore(path)
            server.append_audit(app.config.section("deploy").audit_log, {
                "at": iso_now(), "environment": environment, "outcome": "restored", "detail": path, "by": who()})
            context.say(f"restored {path} in {time.monotonic() - started:.1f} s")
            app.notify(Event("backup.restored", f"{environment}: restored {path}", severity="warning",
                             details={"environment": environment, "file": path}))
