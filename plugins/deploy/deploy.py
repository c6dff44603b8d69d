"""The deploy itself: lock, backup, keep the running image, rsync, build, replace, migrate, health,
and roll back to the kept image when the migrations or the health check fail (seed 002).

Progress lines are the seed's own ("Creating database backup...", "Attempt 3/30 - Status: 502",
"Health check failed! Initiating rollback...") so people and log scrapers find what they knew.
"""

import logging
import os
import secrets as random_tokens
import time
from dataclasses import dataclass, field
from pathlib import Path

from dbdeck.errors import ConfigError, DbdeckError, UsageError
from dbdeck.events import Event

from .model import ALWAYS_EXCLUDED, check_version
from .server import Server, iso_now, now_stamp, who
from .target import make_target

log = logging.getLogger("dbdeck.deploy")
HOOKS = ("pre-deploy", "post-deploy", "post-rollback")
ADOPTED_VERSION = "pre-dbdeck"


class DeployFailed(DbdeckError):
    """The deploy failed; the message says whether the previous version is serving again."""


@dataclass
class Context:
    app: object
    environment: str
    profile: object
    server_settings: object
    path: str
    messages: list = field(default_factory=list)

    @property
    def runner(self):
        return self.app.runner

    def say(self, message):
        self.runner.say(message)
        log.info("%s", message)


def resolve(app, environment):
    """The environment's profile and server settings, with the seed's per-environment defaults."""
    from .model import SEED_PATHS

    settings = app.config.section("deploy")
    profile = settings.profile(environment)
    if profile is None:
        raise UsageError(f"no deploy environment {environment!r} (known: {', '.join(settings.names())})")
    server = settings.server
    if profile.host:
        server = server.model_copy(update={"host": profile.host})
    path = profile.path or server.path or SEED_PATHS.get(environment)
    if not path:
        raise ConfigError(f"deploy.environments.{environment}.path: where the app lives on the server is not set "
                          f"(or set VPS_PATH)")
    return Context(app, environment, profile, server, path)


def open_server(context, probe_in_dry_run=False):
    target = make_target(context.runner, context.server_settings, context.path)
    return Server(target, context.profile, context.environment, probe_in_dry_run)


def default_version(source, runner):
    """GITHUB_SHA's first 12 characters in CI, else the source's git commit, else a timestamp."""
    if os.environ.get("GITHUB_SHA"):
        return os.environ["GITHUB_SHA"][:12]
    if (Path(source) / ".git").exists() or _inside_git(source, runner):
        result = runner.run(["git", "-C", str(source), "rev-parse", "--short=12", "HEAD"], check=False, read_only=True)
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip()
    return now_stamp()


def _inside_git(source, runner):
    result = runner.run(["git", "-C", str(source), "rev-parse", "--is-inside-work-tree"], check=False, read_only=True)
    return result.returncode == 0 and result.stdout.strip() == "true"


def current_branch(source, runner):
    if os.environ.get("GITHUB_REF_NAME"):
        return os.environ["GITHUB_REF_NAME"]
    result = runner.run(["git", "-C", str(source), "rev-parse", "--abbrev-ref", "HEAD"], check=False, read_only=True)
    branch = result.stdout.strip() if result.returncode == 0 else ""
    return branch if branch and branch != "HEAD" else None


class Hooks:
    """Executables pre-deploy, post-deploy, post-rollback in the profile's hooks_dir (run where dbdeck runs)."""

    def __init__(self, directory, runner):
        self.directory = Path(directory) if directory else None
        self.runner = runner

    def check(self):
        if not self.directory:
            return
        if not self.directory.is_dir():
            raise ConfigError(f"hooks_dir {self.directory} is not a directory")
        for name in HOOKS:
            path = self.directory / name
            if path.exists() and not os.access(path, os.X_OK):
                raise ConfigError(f"hook {path} exists but is not executable (chmod +x it)")

    def run(self, name, variables, must_succeed):
        if not self.directory or not (self.directory / name).exists():
            return True
        result = self.runner.run([self.directory / name], env=variables, check=False, timeout=600)
        for line in (result.stdout or "").rstrip().splitlines():
            self.runner.say(f"[{name}] {line}")
        if result.returncode not in (0, None):
            message = f"hook {name} failed with exit status {result.returncode}" + (
                f": {result.stderr.strip().splitlines()[-1]}" if result.stderr.strip() else "")
            if must_succeed:
                raise DeployFailed(message + "; nothing was changed")
            log.warning("%s", message)
            self.runner.say(f"Warning: {message}")
            return False
        return True


class Deployment:
    def __init__(self, context, version=None, check_branch=True):
        self.context = context
        self.profile = context.profile
        self.runner = context.runner
        self.source = Path(self.profile.source).expanduser()
        self.version = valid_version(version) if version else None
        self.check_branch = check_branch
        self.hooks = Hooks(self.profile.hooks_dir, self.runner)
        self.token = random_tokens.token_hex(8)
        self.server = None
        self.previous = None  # version to roll back to
        self.backup_file = None
        self.started = time.monotonic()

    # --- the steps ----------------------------------------------------------------------------------

    def run(self):
        self._prechecks()
        context = self.context
        self.server = open_server(context)
        try:
            self.say(f"Deploying {self.version} to {context.environment} ({self.server.target.describe()})")
            self.server.acquire_lock(self.version, self.token)
            try:
                self._deploy()
            finally:
                self.server.release_lock(self.token)
        finally:
            self.server.target.close()

    def say(self, message):
        self.context.say(message)

    def _prechecks(self):
        profile, context = self.profile, self.context
        if not self.source.is_dir():
            raise ConfigError(f"deploy.environments.{context.environment}.source: {self.source} is not a directory "
                              f"(the application files to send, the seed's deploy-backend/)")
        if not (self.source / profile.compose_file).is_file():
            raise ConfigError(f"{self.source / profile.compose_file} does not exist (compose_file of "
                              f"{context.environment})")
        self.hooks.check()
        if self.version is None:
            self.version = valid_version(default_version(self.source, self.runner))
        if self.check_branch and profile.branch:
            branch = current_branch(self.source, self.runner)
            if branch is not None and branch != profile.branch:
                raise UsageError(f"{context.environment} deploys branch {profile.branch}, but {self.source} is on "
                                 f"{branch}; check out {profile.branch} or pass --any-branch")

    def _deploy(self):
        server, profile = self.server, self.profile
        state = server.read_state()
        self.previous = self._keep_running_image(state)
        self.hooks.run("pre-deploy", self._hook_variables("starting"), must_succeed=True)
        if profile.backup:
            self._backup()
        self._rsync()
        self.say("Building Docker image...")
        server.build()
        built = server.image_id(f"{server.image()}:latest")
        if not self.runner.dry_run and not built:
            raise DeployFailed(f"compose built no image {server.image()}:latest; set image: for "
                               f"{self.context.environment} to the image the compose file builds for "
                               f"{profile.service}")
        self.say("Stopping and removing old container...")
        self.say("Starting new container...")
        server.replace_container()
        self.say("Waiting for container to start...")
        problem = server.wait_running()
        if problem is None and profile.migrate_command:
            problem = self._migrate()
        if problem is None:
            problem = self._health_check()
        if problem is not None:
            self._fail(problem, built, state)
        if self.runner.dry_run:
            self._show_rollback_plan()
        self._succeed(state, built)

    def _show_rollback_plan(self):
        server, profile = self.server, self.profile
        if not profile.rollback:
            self.say("If the migrations or the health check failed: the container's logs would be printed "
                     "(rollback is off for this environment)")
            return
        self.say(f"If the migrations or the health check failed, these would run to roll back to "
                 f"{self.previous}:")
        server.container_logs()
        server.tag(f"{server.image()}:{self.previous}", "latest")
        server.replace_container()

    def _keep_running_image(self, state):
        """Make sure the image serving now has a version tag; return that version (None: first deploy)."""
        server, profile = self.server, self.profile
        running = server.container_image_id()
        current = state.get("current")
        if self.runner.dry_run:
            self.say("Saving current image for rollback...")
            server.tag("<running image>", current or "<current version>")
            return current or "<current version>"
        if not running:
            if current and server.image_id(f"{server.image()}:{current}"):
                return current  # container gone (stopped by hand) but the version's image is kept
            self._first_deploy_notice("no container %s runs and no earlier version is kept" % profile.container)
            return None
        if not current or server.image_id(f"{server.image()}:{current}") != running:
            current = current if current and current != self.version else f"{ADOPTED_VERSION}-{now_stamp()}"
            self.say("Saving current image for rollback...")
            server.tag(running, current)
            history = [h for h in state.setdefault("history", []) if h.get("version") != current]
            state["history"] = [{"version": current, "image_id": running, "deployed_at": None,
                                 "by": "adopted by dbdeck"}, *history]
            state["current"] = current
        return current

    def _first_deploy_notice(self, why):
        if self.profile.rollback:
            self.say(f"First deploy: {why}, so if this deploy fails there is nothing to roll back to; "
                     f"it would have to be fixed by hand on the server.")

    def _backup(self):
        server, profile = self.server, self.profile
        self.say("Creating database backup...")
        try:
            self.backup_file = server.create_backup()
        except DbdeckError as exc:
            if profile.backup_required:
                raise DeployFailed(f"database backup failed, deploy stopped before changing anything "
                                   f"(backup_required: true): {exc}") from None
            self.say(f"Warning: Database backup failed: {exc}")
            return
        removed = server.prune_backups(profile.backups_keep)
        self.say(f"Backup written: {self.backup_file}" + (f" (removed {len(removed)} older)" if removed else ""))
        self.context.app.record_result(f"backup {self.context.environment}", "backup", True,
                                       f"wrote {self.backup_file} (before deploying {self.version})",
                                       file=self.backup_file)

    def _rsync(self):
        profile = self.profile
        excludes = list(dict.fromkeys([*profile.excludes, *ALWAYS_EXCLUDED]))
        options = ["-az", "--itemize-changes", *(["--delete"] if profile.rsync_delete else [])]
        for pattern in excludes:
            options += ["--exclude", pattern]
        self.say("Syncing files to server" + (" (with --delete)" if profile.rsync_delete else "") + "...")
        self.server.sh(f"mkdir -p {self._quoted_path()}", in_app_dir=False)
        result = self.runner.run(self.server.target.rsync_argv(self.source, options), timeout=3600)
        changed = [line for line in (result.stdout or "").splitlines() if line and not line.startswith(".")]
        if not self.runner.dry_run:
            self.say(f"{len(changed)} files changed")

    def _quoted_path(self):
        import shlex

        return shlex.quote(self.context.path)

    def _migrate(self):
        self.say("Running migrations...")
        result = self.server.migrate()
        for line in (result.stdout or "").rstrip().splitlines()[-40:]:
            self.say(f"  {line}")
        if result.returncode not in (0, None):
            self.say("ERROR: Migration failed!")
            return f"migrations failed (exit status {result.returncode})"
        return None

    def _health_check(self):
        if not self.profile.health_url:
            self.say(f"No health_url for {self.context.environment}: only the container running is checked "
                     f"(set deploy.environments.{self.context.environment}.health_url)")
        problem = check_health(self.context, self.server)
        if problem:
            self.say("Health check failed! Initiating rollback..." if self.profile.rollback else "Health check failed!")
        return problem

    # --- outcomes -----------------------------------------------------------------------------------

    def _succeed(self, state, built):
        server = self.server
        if self.runner.dry_run:
            server.tag(f"{server.image()}:latest", self.version)
            self.hooks.run("post-deploy", self._hook_variables("succeeded"), must_succeed=False)
            self.context.app.notify(Event("deploy.succeeded", f"{self.context.environment}: {self.version} deployed"))
            self.say(f"Dry run of {self.version} to {self.context.environment} done: nothing was run, nothing changed")
            return
        server.tag(f"{server.image()}:latest", self.version)
        history = [h for h in state.get("history", []) if h.get("version") != self.version]
        # "previous" is what served before this version: the target of a rollback from it, by hand or not
        history.insert(0, {"version": self.version, "image_id": built, "deployed_at": iso_now(), "by": who(),
                           "previous": self.previous})
        pruned = self._prune(history)
        state.update(current=self.version, environment=self.context.environment,
                     history=[h for h in history if h["version"] not in pruned])
        server.write_state(state)
        self._audit("deployed", f"{self.version} is live")
        self.say(f"Deploy of {self.version} to {self.context.environment} succeeded"
                 + (f" (removed old image versions: {', '.join(pruned)})" if pruned else ""))
        self.hooks.run("post-deploy", self._hook_variables("succeeded"), must_succeed=False)
        self.context.app.notify(Event("deploy.succeeded", f"{self.context.environment}: {self.version} deployed",
                                      details=self._details("succeeded")))

    def _prune(self, history):
        """Keep the newest versions_keep versions, and always the one a rollback would return to."""
        keep = self.profile.versions_keep
        protected = {self.version, self.previous}
        pruned = [h["version"] for h in history[keep:] if h["version"] not in protected]
        for version in pruned:
            self.server.remove_tag(version)
        return pruned

    def _fail(self, problem, built, state):
        server, profile = self.server, self.profile
        logs = server.container_logs()
        self.say("Container logs before rollback:" if profile.rollback else "Container logs:")
        for line in (logs or "").rstrip().splitlines():
            self.say(f"  {line}")
        if not profile.rollback:
            self._audit("failed", problem)
            self._notify_failure("deploy.failed", f"{self.context.environment}: {self.version} failed: {problem}")
            raise DeployFailed(f"{problem}; rollback is off for {self.context.environment}, "
                               f"{self.version} stays deployed")
        if not self.previous:
            self.say("No rollback image available!")
            self._audit("failed", problem + "; no previous version to roll back to")
            self._notify_failure("deploy.failed", f"{self.context.environment}: {self.version} failed: {problem}")
            raise DeployFailed(f"{problem}; this was the first deploy, so there is no previous version to roll "
                               f"back to: fix it by hand on the server")
        self.say("Rolling back to previous version...")
        healthy = roll_back_to(self.context, server, self.previous, state)
        if built:
            server.sh(f"docker rmi {built} >/dev/null 2>&1 || true", check=False)  # the failed build, now untagged
        outcome = "rolled_back" if healthy else "rollback_unhealthy"
        self._audit(outcome, problem)
        restore_hint = (f"; the database was backed up first to {self.backup_file} (restore with: backup restore "
                        f"{self.backup_file.split('/')[-1]} --env {self.context.environment})" if self.backup_file
                        else "")
        if problem.startswith("migrations"):
            self.say("Rollback completed. Please check migrations manually.")
        # post-rollback gets the same variables by hand or automatic: VERSION is what serves now,
        # PREVIOUS_VERSION the one rolled away from (here the version that failed)
        self.hooks.run("post-rollback", hook_variables(self.context, self.previous, self.version, outcome, problem),
                       must_succeed=False)
        self._notify_failure("deploy.rolled_back",
                             f"{self.context.environment}: {self.version} failed ({problem}); rolled back to "
                             f"{self.previous}" + ("" if healthy else ", which is NOT healthy either"))
        if healthy:
            raise DeployFailed(f"{problem}; rolled back to {self.previous}, which is serving and healthy"
                               + restore_hint)
        raise DeployFailed(f"{problem}; rolled back to {self.previous}, but it is not healthy either: "
                           f"look at the server now" + restore_hint)

    def _notify_failure(self, kind, message):
        self.context.app.notify(Event(kind, message, severity="critical", details=self._details(kind)))

    def _audit(self, outcome, detail):
        entry = {"at": iso_now(), "environment": self.context.environment, "version": self.version,
                 "previous": self.previous, "outcome": outcome, "detail": detail, "by": who(),
                 "backup": self.backup_file, "seconds": round(time.monotonic() - self.started, 1)}
        self.server.append_audit(self.context.app.config.section("deploy").audit_log, entry)
        self.context.app.record_result(f"deploy {self.context.environment}", "deploy", outcome == "deployed",
                                       f"{self.version}: {outcome}" + ("" if outcome == "deployed" else f": {detail}"),
                                       entry["seconds"], version=self.version, previous=self.previous)

    def _details(self, outcome):
        return {"environment": self.context.environment, "version": self.version, "previous": self.previous,
                "outcome": outcome, "backup": self.backup_file}

    def _hook_variables(self, outcome, reason=""):
        return hook_variables(self.context, self.version, self.previous, outcome, reason)


def valid_version(version):
    try:
        return check_version(version)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def hook_variables(context, version, previous, outcome, reason=""):
    return {"DBDECK_DEPLOY_ENV": context.environment, "DBDECK_DEPLOY_VERSION": version or "",
            "DBDECK_DEPLOY_PREVIOUS_VERSION": previous or "", "DBDECK_DEPLOY_OUTCOME": outcome,
            "DBDECK_DEPLOY_REASON": reason, "DBDECK_DEPLOY_TARGET": context.path,
            "DBDECK_DEPLOY_HOST": context.server_settings.host or "local"}


def roll_back_to(context, server, version, state):
    """Point :latest at a kept version, recreate the container, check health; True when healthy."""
    profile = context.profile
    image = server.image()
    if not context.runner.dry_run and not server.image_id(f"{image}:{version}"):
        raise DeployFailed(f"image {image}:{version} is not on the server (kept: {', '.join(server.tags()) or 'none'})")
    server.tag(f"{image}:{version}", "latest")
    server.replace_container()
    problem = server.wait_running()
    healthy = problem is None
    if healthy and profile.health_url:
        context.say("Rollback completed. Checking health...")
        healthy = check_health(context, server) is None
    state["current"] = version
    server.write_state(state)
    context.say(f"Rolled back to {version}: "
                + ("healthy" if healthy else f"NOT healthy ({problem or 'health check'})"))
    return healthy


def check_health(context, server):
    """The seed's loop: GET the URL up to N times, interval apart, until it answers the expected status.
    None when healthy, else why not."""
    profile, runner = context.profile, context.runner
    url = profile.health_url
    if not url:
        return None
    for attempt in range(1, profile.health_attempts + 1):
        if profile.health_from == "server":
            status = server.health_from_server(url, profile.health_timeout)
        elif runner.dry_run:
            runner.say(f"would check: GET {url} expecting {profile.health_status}, up to {profile.health_attempts} "
                       f"times {profile.health_interval:g} s apart")
            status = None
        else:
            status = http_status(url, profile.health_timeout)
        if runner.dry_run:
            return None
        if status == str(profile.health_status):
            context.say("Health check OK!")
            return None
        context.say(f"Attempt {attempt}/{profile.health_attempts} - Status: {status}")
        if attempt < profile.health_attempts:
            time.sleep(profile.health_interval)
    return f"health check failed after {profile.health_attempts} attempts ({url})"


def http_status(url, timeout):
    """The HTTP status of GET url as a string, '000' when nothing answered (as curl prints)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout) as response:
            return str(response.status)
    except urllib.error.HTTPError as exc:
        return str(exc.code)
    except (urllib.error.URLError, OSError, ValueError):
        return "000"

