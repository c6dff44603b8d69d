"""The `deploy:` section: the server, and one profile per environment (the seed's table).

Built-in profiles reproduce seed 002 so that `deploy --env production` works with only VPS_HOST set:

    | environment | branch  | port | container       | backup | rollback | health attempts | rsync --delete |
    | production  | main    | 3001 | crm-backend     | yes    | yes      | 30 x 5 s        | no             |
    | staging     | develop | 3002 | crm-backend-dev | no     | no       | 20 x 5 s        | yes            |

A profile in the YAML is merged over the built-in one of the same name, key by key.
"""

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, PositiveFloat, PositiveInt, field_validator, model_validator

from dbdeck.config import Section


# rsync never sends these, whatever a profile lists: secrets stay on the server, and dbdeck's own
# state and the backups must survive a staging `--delete`.
ALWAYS_EXCLUDED = (".env", ".env.*", "backups", ".dbdeck", ".git")

SEED_EXCLUDES_PRODUCTION = ["node_modules", "dist", ".env", ".env.*", "coverage", "backups", "certbot",
                            "*.test.ts", "src/test", "logs", "uploads"]
SEED_EXCLUDES_STAGING = ["node_modules", "dist", ".env", ".env.*", "coverage", "backups", "*.test.ts", "src/test"]

_DOCKER_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DOCKER_NAME = re.compile(r"^[a-z0-9]+(?:[._-]+[a-z0-9]+)*(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*$")
_CONTAINER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _container_name(value):
    if not _CONTAINER.match(value):
        raise ValueError(f"{value!r} is not a container name")
    return value


ContainerName = Annotated[str, AfterValidator(_container_name)]


def check_version(value):
    """A version becomes a Docker tag: letters, digits, _ . - (max 128, not starting with . or -)."""
    if not _DOCKER_TAG.match(str(value)) or value == "latest":
        raise ValueError(f"version {value!r} cannot be an image tag: use letters, digits, '_', '.', '-' "
                         f"(at most 128, not starting with '.' or '-', and not 'latest')")
    return str(value)


class Server(Section):
    """How to reach the server: over SSH from the CI runner, or `local` when dbdeck runs on it."""

    target: Literal["ssh", "local"] = "ssh"
    host: str | None = None
    user: str = "root"
    port: PositiveInt = 22
    key_file: Path | None = None
    known_hosts: Path | None = None
    # yes: the host key must already be in known_hosts (the seed used StrictHostKeyChecking=no, which
    # lets anyone on the path impersonate the server); accept-new trusts the first key seen
    host_key_checking: Literal["yes", "accept-new"] = "yes"
    connect_timeout: PositiveInt = 15
    path: str | None = None


class Database(Section):
    """The app database, dumped through its container as the seed did (`docker exec crm-postgres pg_dump`)."""

    container: ContainerName = "crm-postgres"
    user: str = "crm_user"
    name: str = "crm_whatsapp_saas"
    format: Literal["plain", "custom"] = "plain"


class Profile(Section):
    """One environment. Unset server keys (host, user, path...) come from `deploy.server`."""

    branch: str | None = None
    # the port the app listens on, on the server: without health_url, the health check is
    # GET http://localhost:PORT/api/health run on the server (the seed's path)
    port: PositiveInt | None = None
    container: ContainerName
    service: str = "backend"
    compose_file: str = "docker-compose.yml"
    compose_project: str | None = None
    compose_command: Literal["auto", "docker compose", "docker-compose"] = "auto"
    # the image compose builds for the service; default <project>-<service> (v1: <project>_<service>)
    image: str | None = None
    path: str | None = None
    host: str | None = None
    source: Path = Path("deploy-backend")

    backup: bool = False
    # production stops when the backup fails: the deploy runs migrations, and a migration that damages
    # data with no backup taken is unrecoverable, while a deploy delayed by a failed backup is not
    backup_required: bool = True
    backups_keep: PositiveInt = 5
    database: Database = Database()

    rollback: bool = False
    versions_keep: PositiveInt = 3

    rsync_delete: bool = False
    excludes: list[str] = []

    migrate_command: list[str] = ["npx", "prisma", "migrate", "deploy"]
    start_timeout: PositiveFloat = 60.0

    health_url: str | None = None
    # runner: the URL is fetched from where dbdeck runs (the seed's public https URL);
    # server: with curl on the server (for a localhost:PORT URL)
    health_from: Literal["runner", "server"] = "runner"
    health_attempts: PositiveInt = 20
    health_interval: float = Field(5.0, ge=0)
    health_timeout: PositiveFloat = 10.0
    health_status: int = 200
    log_lines: PositiveInt = 50

    hooks_dir: Path | None = None

    @field_validator("image")
    @classmethod
    def _image(cls, value):
        if value is not None and not _DOCKER_NAME.match(value):
            raise ValueError(f"{value!r} is not an image name (lowercase, without a tag)")
        return value

    @field_validator("excludes")
    @classmethod
    def _excludes(cls, value):
        for pattern in value:
            if not pattern or pattern.startswith("-") or "\n" in pattern:
                raise ValueError(f"exclude pattern {pattern!r} is not a plain rsync pattern")
        return value

    @model_validator(mode="after")
    def _health(self):
        if self.health_url and not re.match(r"^https?://[^/\s]+", self.health_url):
            raise ValueError(f"health_url must be an http(s) URL, got {self.health_url!r}")
        if not self.health_url and self.port:
            # the app's own port on its own server, with the seed's path: never a URL outside this config
            self.health_url = f"http://localhost:{self.port}/api/health"
            if "health_from" not in self.model_fields_set:
                self.health_from = "server"
        return self


SEED_PROFILES = {
    "production": dict(branch="main", port=3001, container="crm-backend", compose_file="docker-compose.production.yml",
                       backup=True, backup_required=True, rollback=True, health_attempts=30, health_interval=5,
                       rsync_delete=False, excludes=SEED_EXCLUDES_PRODUCTION),
    # the seed does not name staging's compose file; docker-compose.yml is a guess, set compose_file
    "staging": dict(branch="develop", port=3002, container="crm-backend-dev", compose_file="docker-compose.yml",
                    backup=False, backup_required=False, rollback=False, health_attempts=20, health_interval=5,
                    health_url="http://localhost:3002/api/health", health_from="server",
                    rsync_delete=True, excludes=SEED_EXCLUDES_STAGING),
}
SEED_PATHS = {"production": "/root/deploy-backend", "staging": "/root/deploy-backend-dev"}


class Deploy(Section):
    """Compose deploys: backup, versioned images, rsync, build, migrate, health check, rollback."""

    server: Server = Server()
    environments: dict[str, Profile] = {}
    audit_log: str = ".dbdeck/audit.log"

    @model_validator(mode="before")
    @classmethod
    def _over_seed_profiles(cls, data):
        data = dict(data or {})
        given = data.get("environments") or {}
        if not isinstance(given, dict):
            return data
        merged = {name: dict(profile) for name, profile in SEED_PROFILES.items()}
        for name, overrides in given.items():
            if isinstance(overrides, dict) or overrides is None:
                merged[name] = {**merged.get(name, {}), **(overrides or {})}
            else:
                merged[name] = overrides
        data["environments"] = merged
        return data

    @field_validator("environments")
    @classmethod
    def _names(cls, value):
        for name in value:
            if not re.match(r"^[A-Za-z0-9_-]+$", name):
                raise ValueError(f"environment name {name!r}: use letters, digits, '-' and '_'")
        return value

    def names(self):
        return sorted(self.environments)

    def profile(self, name):
        return self.environments.get(name)
