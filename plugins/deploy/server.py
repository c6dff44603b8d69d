"""What deploy does on the server: lock, state, backups, image versions, compose, health.

Each method is one shell snippet (see target.py). In a dry run nothing runs, so every probe
returns "unknown" (None / empty) and the caller plans for both cases.
"""

import json
import re
import shlex
import socket
import time

from dbdeck import output
from dbdeck.endpoints import dbname_argument
from dbdeck.errors import DbdeckError, LockBusy, UsageError

from .target import quote

STATE_DIR = ".dbdeck"
LOCK_FILE = f"{STATE_DIR}/deploy.lock"
STATE_FILE = f"{STATE_DIR}/deploy-state.json"
BACKUP_DIR = "backups"
_BACKUP_NAME = re.compile(r"^(?P<prefix>[a-z-]+)-(?P<stamp>\d{8}-\d{6})\.(?P<ext>sql|dump)$")


def now_stamp():
    return time.strftime("%Y%m%d-%H%M%S")


def iso_now():
    return output.timestamp()


def who():
    """Who is deploying: the CI run when there is one, else user@host."""
    import getpass
    import os

    parts = [f"{getpass.getuser()}@{socket.gethostname()}"]
    if os.environ.get("GITHUB_RUN_ID"):
        parts.append(f"github run {os.environ.get('GITHUB_REPOSITORY', '')}#{os.environ['GITHUB_RUN_ID']}"
                     f" by {os.environ.get('GITHUB_ACTOR', '?')}")
    return ", ".join(parts)


class Server:
    """One environment's app directory on its server."""

    def __init__(self, target, profile, environment, probe_in_dry_run=False):
        self.target = target
        self.profile = profile
        self.environment = environment
        # a deploy's dry run runs nothing on the server, not even reads; status and lists do read
        self.probe_in_dry_run = probe_in_dry_run
        self._compose = None
        self._image = None

    @property
    def dry_run(self):
        return self.target.runner.dry_run

    def sh(self, script, read_only=False, **kwargs):
        return self.target.sh(script, read_only=read_only and self.probe_in_dry_run, **kwargs)

    # --- lock -------------------------------------------------------------------------------------

    def acquire_lock(self, version, token, message=None):
        record = json.dumps({"token": token, "by": who(), "started": iso_now(), "version": version,
                             "environment": self.environment, **({"message": message} if message else {})})
        # noclobber makes the shell create the file with O_EXCL: of two deploys, exactly one wins
        result = self.sh(f"mkdir -p {STATE_DIR} && if (set -C; cat > {LOCK_FILE}) 2>/dev/null; then echo acquired; "
                         f"else echo held; cat {LOCK_FILE}; fi", stdin=record + "\n")
        if self.dry_run:
            return
        first, _, rest = result.stdout.partition("\n")
        if first.strip() != "acquired":
            raise LockBusy(f"another deploy holds the lock on {self.target.describe()}: {describe_holder(rest)}. "
                           f"If that deploy is dead, release it with: deploy lock release --env {self.environment}")

    def release_lock(self, token=None):
        """Release our own lock (token), or whatever lock there is (token None, an explicit release)."""
        if token:
            script = f"if grep -qF {shlex.quote(token)} {LOCK_FILE} 2>/dev/null; then rm -f {LOCK_FILE}; fi"
        else:
            script = f"if [ -e {LOCK_FILE} ]; then cat {LOCK_FILE}; rm -f {LOCK_FILE}; fi"
        return self.sh(script).stdout

    def lock_holder(self):
        text = self.sh(f"cat {LOCK_FILE} 2>/dev/null || true", read_only=True).stdout
        if not text and not self.sh(f"test -e {LOCK_FILE} && echo held || true", read_only=True).stdout.strip():
            return None
        return parse_holder(text)

    # --- state ------------------------------------------------------------------------------------

    def read_state(self):
        text = self.sh(f"cat {STATE_FILE} 2>/dev/null || true", read_only=True).stdout
        if not text.strip():
            return {"current": None, "history": []}
        try:
            state = json.loads(text)
        except ValueError:
            raise DbdeckError(f"{self.target.describe()}/{STATE_FILE} is not valid JSON; fix or remove it") from None
        state.setdefault("history", [])
        return state

    def write_state(self, state):
        self.sh(f"mkdir -p {STATE_DIR} && cat > {STATE_FILE}.tmp && mv -f {STATE_FILE}.tmp {STATE_FILE}",
                stdin=json.dumps(state, indent=2) + "\n")

    def append_audit(self, path, entry):
        directory = path.rsplit("/", 1)[0] if "/" in path else "."
        self.sh(f"mkdir -p {shlex.quote(directory)} && cat >> {shlex.quote(path)}", stdin=json.dumps(entry) + "\n")

    # --- docker and compose -----------------------------------------------------------------------

    def compose(self):
        """`docker compose` (v2 plugin) or `docker-compose` (v1, or a v2 standalone), with -f/-p."""
        if self._compose is None:
            self._compose = self._detect_compose()
        argv, _ = self._compose
        files = ["-f", self.profile.compose_file]
        if self.profile.compose_project:
            files += ["-p", self.profile.compose_project]
        return quote(*argv, *files)

    def _detect_compose(self):
        """(argv, major version or None until asked): `docker compose version` is cheap, but v1's
        `docker-compose version` starts a Python program, so for it only its presence is checked here."""
        wanted = self.profile.compose_command
        if self.dry_run and not self.probe_in_dry_run:
            if wanted == "auto":  # a dry run does not connect: say which the real run picks, and how
                self.target.runner.say("compose_command auto: the commands below show `docker compose` (v2); "
                                       "the real run uses `docker-compose` (v1) where the server has no compose "
                                       "plugin. Set compose_command to see the exact one.")
            return (["docker-compose"] if wanted == "docker-compose" else ["docker", "compose"]), \
                (1 if wanted == "docker-compose" else 2)
        candidates = [["docker", "compose"], ["docker-compose"]]
        if wanted != "auto":
            candidates = [wanted.split()]
        for argv in candidates:
            if argv == ["docker", "compose"]:
                major = self._compose_version(argv)
                if major is not None:
                    return argv, major
                continue
            found = self.sh(f"command -v {quote(argv[0])} >/dev/null 2>&1", check=False, in_app_dir=False,
                            read_only=True)
            if found.returncode == 0:
                return argv, None
        raise DbdeckError(f"neither `docker compose` nor `docker-compose` works on {self.target.describe()}; "
                          f"install docker-compose (v1) or the compose plugin (v2)")

    def _compose_version(self, argv):
        result = self.sh(f"{quote(*argv)} version --short 2>/dev/null", check=False, in_app_dir=False,
                         read_only=True)
        version = result.stdout.strip().lstrip("v")
        return int(version.split(".")[0]) if result.returncode == 0 and version[:1].isdigit() else None

    def _compose_major(self):
        argv, major = self._compose
        if major is None:
            major = self._compose_version(argv)
            if major is None:
                raise DbdeckError(f"`{' '.join(argv)} version` fails on {self.target.describe()}; install "
                                  f"docker-compose (v1) or the compose plugin (v2)")
            self._compose = argv, major
        return major

    def image(self):
        """The image repository compose builds for the service: `image:` in dbdeck's profile, else what
        compose itself says (`compose config`: the service's `image:` with the server's .env applied,
        or v2's project name), else compose's naming rule for the version found (v1 `<project>_<service>`,
        v2 `<project>-<service>`)."""
        if self.profile.image:
            return self.profile.image
        if self._image is None:
            named, project = self._ask_compose()
            if named:
                self._image = named
                return named
            project = project or self.profile.compose_project or self.target.path.rstrip("/").rsplit("/", 1)[-1]
            project = re.sub(r"[^a-z0-9_-]", "", project.lower())
            # a guess is not remembered: before the first rsync compose has no file to answer from
            return f"{project}{'_' if self._compose_major() == 1 else '-'}{self.profile.service}"
        return self._image

    def _ask_compose(self):
        """(the service's image repository, the project name) from `compose config`; None where unknown."""
        if self._compose is None:
            self._compose = self._detect_compose()
        result = self.sh(f"{self.compose()} config 2>/dev/null", read_only=True, check=False)
        if result.returncode != 0 or not result.stdout.strip():
            return None, None
        import yaml

        try:
            data = yaml.safe_load(result.stdout) or {}
        except yaml.YAMLError:
            return None, None
        service = ((data.get("services") or {}).get(self.profile.service)) or {}
        image = service.get("image") if isinstance(service, dict) else None
        if image:
            repository, _, tag = image.rpartition(":")
            image = repository if repository and "/" not in tag else image
        return image or None, data.get("name")

    def container_image_id(self):
        result = self.sh(f"docker inspect -f '{{{{.Image}}}}' {quote(self.profile.container)} 2>/dev/null || true",
                         read_only=True)
        return result.stdout.strip() or None

    def image_id(self, reference):
        result = self.sh(f"docker image inspect -f '{{{{.Id}}}}' {quote(reference)} 2>/dev/null || true",
                         read_only=True)
        return result.stdout.strip() or None

    def tags(self):
        """Tags of the app image present on the server."""
        result = self.sh(f"docker image ls --format '{{{{.Tag}}}}' {quote(self.image())}", read_only=True)
        return [t for t in result.stdout.split() if t and t != "<none>"]

    def tag(self, source, tag):
        self.sh(f"docker tag {quote(source)} {quote(f'{self.image()}:{tag}')}")

    def remove_tag(self, tag):
        self.sh(f"docker rmi {quote(f'{self.image()}:{tag}')} >/dev/null", check=False)

    def build(self):
        self.sh(f"{self.compose()} build {quote(self.profile.service)}", timeout=3600)

    def replace_container(self):
        container = quote(self.profile.container)
        self.sh(f"{{ docker stop {container} >/dev/null 2>&1 || true; }} && "
                f"{{ docker rm -f {container} >/dev/null 2>&1 || true; }} && "
                f"{self.compose()} up -d --no-deps --no-build {quote(self.profile.service)}", timeout=600)

    def container_state(self):
        result = self.sh(f"docker inspect -f '{{{{.State.Status}}}} {{{{.State.ExitCode}}}}' "
                         f"{quote(self.profile.container)} 2>/dev/null || echo missing -1", read_only=True)
        status, _, code = result.stdout.strip().partition(" ")
        return status, code

    def wait_running(self):
        """Wait until the container runs (the seed slept 10 s); None when it does, else why not."""
        if self.dry_run:
            return None
        deadline = time.monotonic() + self.profile.start_timeout
        while True:
            status, code = self.container_state()
            if status == "running":
                return None
            if status in ("exited", "dead", "missing") or time.monotonic() > deadline:
                return f"container {self.profile.container} is {status}" + (f" (exit status {code})"
                                                                            if status == "exited" else "")
            time.sleep(0.5)

    def migrate(self):
        command = self.profile.migrate_command
        return self.sh(f"{self.compose()} exec -T {quote(self.profile.service)} {quote(*command)} 2>&1",
                       check=False, timeout=1800)

    def container_logs(self):
        return self.sh(f"docker logs --tail {int(self.profile.log_lines)} {quote(self.profile.container)} 2>&1 || true",
                       check=False).stdout

    def health_from_server(self, url, timeout):
        result = self.sh(f"curl -s -o /dev/null -w '%{{http_code}}' --max-time {int(timeout)} {quote(url)} || true",
                         check=False, in_app_dir=False)
        return result.stdout.strip()[-3:] or "000"

    # --- backups ----------------------------------------------------------------------------------

    def backups(self):
        """Backup file names on the server, newest first, with sizes."""
        result = self.sh(f"ls -ln {BACKUP_DIR} 2>/dev/null || true", read_only=True)
        rows = []
        for line in result.stdout.splitlines():
            fields = line.split(None, 8)
            if len(fields) == 9 and _BACKUP_NAME.match(fields[8]):
                rows.append({"file": f"{BACKUP_DIR}/{fields[8]}", "name": fields[8], "bytes": int(fields[4]),
                             "mode": fields[0]})
        rows.sort(key=lambda r: (_BACKUP_NAME.match(r["name"])["stamp"], r["name"]), reverse=True)
        return rows

    def create_backup(self, prefix="pre-deploy"):
        """pg_dump through the database container into backups/<prefix>-STAMP.sql (0600); returns its path."""
        database = self.profile.database
        existing = {row["name"] for row in self.backups()} if not self.dry_run else set()
        extension = "dump" if database.format == "custom" else "sql"
        name = f"{prefix}-{now_stamp()}.{extension}"
        while name in existing:  # two backups within one second: the name is the order, so wait
            time.sleep(0.2)
            name = f"{prefix}-{now_stamp()}.{extension}"
        path = f"{BACKUP_DIR}/{name}"
        running = self.sh(f"docker inspect -f '{{{{.State.Running}}}}' {quote(database.container)} 2>/dev/null "
                          f"|| echo missing", read_only=True).stdout.strip()
        if not self.dry_run and running != "true":
            raise DbdeckError(f"database container {database.container} is not running")
        # --clean --if-exists: restoring the file replaces the database's objects instead of failing on them
        dump = quote("docker", "exec", database.container, "pg_dump", "-U", database.user, "--clean", "--if-exists",
                     *(["-Fc"] if database.format == "custom" else []), "-d", dbname_argument(database.name))
        self.sh(f"umask 077 && mkdir -p {BACKUP_DIR} && if {dump} > {quote(path)}.partial; "
                f"then mv -f {quote(path)}.partial {quote(path)}; else rm -f {quote(path)}.partial; exit 1; fi",
                timeout=6 * 3600)
        return path

    def prune_backups(self, keep, prefix="pre-deploy"):
        old = [row["file"] for row in self.backups() if row["name"].startswith(prefix + "-")][keep:]
        if old:
            self.sh(f"rm -f -- {quote(*old)}")
        return old

    def restore(self, name):
        database = self.profile.database
        path = backup_path(name)
        if path.endswith(".dump"):
            command = quote("docker", "exec", "-i", database.container, "pg_restore", "-U", database.user,
                            "--clean", "--if-exists", "--single-transaction", "--exit-on-error",
                            "-d", dbname_argument(database.name))
        else:
            command = quote("docker", "exec", "-i", database.container, "psql", "-U", database.user, "-q",
                            "-v", "ON_ERROR_STOP=1", "--single-transaction", "-d",
                            dbname_argument(database.name))
        self.sh(f"{command} < {quote(path)} >/dev/null", timeout=6 * 3600)

    def backup_exists(self, name):
        path = backup_path(name)
        return self.sh(f"test -f {quote(path)} && echo yes || echo no", read_only=True).stdout.strip() == "yes"


def backup_path(name):
    """backups/<name> from 'name' or 'backups/name'; anything else (paths, globs) is refused."""
    base = name[len(BACKUP_DIR) + 1:] if name.startswith(BACKUP_DIR + "/") else name
    if not _BACKUP_NAME.match(base):
        raise UsageError(f"{name!r} is not a backup file name (expected e.g. pre-deploy-20260112-103300.sql; "
                         f"see `backup list`)")
    return f"{BACKUP_DIR}/{base}"


def parse_holder(text):
    if not text.strip():
        return {}
    try:
        return json.loads(text)
    except ValueError:
        return {"raw": text.strip()[:200]}


def describe_holder(text_or_holder):
    holder = parse_holder(text_or_holder) if isinstance(text_or_holder, str) else text_or_holder
    if not holder:
        return "unknown holder (empty lock file)"
    if "raw" in holder:
        return holder["raw"]
    if holder.get("version") == "manual":
        what = f"holding {holder.get('environment', '?')} by hand"
    else:
        what = f"deploying {holder.get('version', '?')} to {holder.get('environment', '?')}"
    message = f": {holder['message']}" if holder.get("message") else ""
    return f"{holder.get('by', '?')}, {what} since {holder.get('started', '?')}{message}"

