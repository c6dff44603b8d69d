"""`dbdeck sandbox`: a set of throwaway servers and a ready config file pointing at them.

Layout of the sandbox directory (default ./.dbdeck-sandbox):

    state.json        what runs where (ports, data dirs)
    dbdeck.yaml       endpoints prod, dev, conecta-postgres, conecta-postgres-replica, tenant
                      (passwords by password_file)
    secrets/          generated passwords, 0600
    data/             server data directories (or a directory under /var/tmp when, as root,
                      the sandbox path is not traversable by the postgres/mysql users)
"""

import os
import secrets as token
import shutil
import tempfile
from pathlib import Path

import yaml

from dbdeck import secrets
from dbdeck.errors import DbdeckError
from dbdeck.state import StateFile

from .servers import MariaDBServer, PostgresServer, fits_a_unix_socket, free_port, traversable_by_others

STATE_VERSION = 1
REPLICATION_USER = "replicator"
REPLICATION_SLOT = "replica_slot"
# the pair is named as the seed names its containers, not by role: after a failover the "replica"
# is the primary, and "primary rejoined as a standby of standby" would be nonsense
FIRST_NODE, SECOND_NODE = "conecta-postgres", "conecta-postgres-replica"
LEGACY_NAMES = {"primary": FIRST_NODE, "standby": SECOND_NODE}  # sandboxes made before the rename
SAMPLE_DIR = Path(__file__).parent

# name -> (kind, database, role, description)
COMPONENTS = {
    "prod": ("postgresql", "crm_production", "production", "PostgreSQL 'prod' (CRM production database)"),
    "dev": ("postgresql", "crm_development", "development", "PostgreSQL 'dev' (CRM development database)"),
    FIRST_NODE: ("postgresql", "conecta_db", None, "replication pair: starts as the primary"),
    SECOND_NODE: ("postgresql", "conecta_db", None, f"replication pair: starts as a hot standby of {FIRST_NODE}"),
    "tenant": ("mysql", "tenant_exatron", None, "MariaDB tenant database (instance 'exatron')"),
}
DEFAULT_COMPONENTS = tuple(COMPONENTS)
# a second database on dev's server: the "external" side (Neon in the seed) of sync-databases
EXTERNAL_DATABASE = "crm_external"
# the seeds' own way, `docker exec crm-postgres ...`: opt-in, it needs Docker and the dbdeck-base image
CONTAINERS = {"prod-container": ("crm-postgres", "crm_production", "production"),
              "dev-container": ("crm-postgres-dev", "crm_development", "development")}
CONTAINERS_PROJECT = "dbdeck-sandbox"


def _project(prefix):
    return CONTAINERS_PROJECT + (f"-{prefix.strip('-_').lower()}" if prefix else "")


def new_password():
    value = token.token_urlsafe(18)
    secrets.register(value)
    return value


def _socket_dir(data_root, name):
    """<data_root>/<name>.run, or a new directory under /tmp when that path is too long for a unix socket
    (a deep --dir): state.json records which, and `sandbox down` removes it with the server."""
    preferred = data_root / f"{name}.run"
    if fits_a_unix_socket(preferred):
        return preferred
    return Path(tempfile.mkdtemp(prefix=f"dbdeck-{name[:12]}-", dir="/tmp"))


class Sandbox:
    def __init__(self, directory, runner):
        self.dir = Path(directory).absolute()
        self.runner = runner
        self.state_path = self.dir / "state.json"
        self.config_path = self.dir / "dbdeck.yaml"
        self.secrets_dir = self.dir / "secrets"

    # --- state ----------------------------------------------------------------------------------
    def load_state(self):
        state = StateFile(self.state_path).read() or None
        if state:
            state["servers"] = {LEGACY_NAMES.get(name, name): info for name, info in state.get("servers", {}).items()}
        return state

    def _save_state(self, state):
        StateFile(self.state_path).write(state)

    def password(self, name):
        return (self.secrets_dir / f"{name}.password").read_text().strip()

    def _write_secret(self, name, value):
        self.secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.secrets_dir / f"{name}.password"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(value + "\n")
        return path

    def server(self, name, state=None):
        state = state or self.load_state()
        info = state["servers"][name]
        if info["kind"] == "postgresql":
            return PostgresServer(info["datadir"], info["port"], self.runner, socket_dir=info["socket_dir"])
        return MariaDBServer(info["datadir"], info["port"], self.runner)

    # --- up / status / down ---------------------------------------------------------------------
    def up(self, components=DEFAULT_COMPONENTS, sample_data=True, progress=lambda line: None,
           with_containers=False):
        state = self.load_state()
        if state:
            for name in state["servers"]:
                server = self.server(name, state)
                if not server.is_running():
                    progress(f"starting {name} (port {state['servers'][name]['port']})")
                    server.start()
            missing = [c for c in components if c not in state["servers"]]
            if with_containers and not state.get("containers"):
                missing.append("the containers")
            if state.get("containers"):
                self._compose("up", "-d", state=state)
            if not missing:
                return state
            raise DbdeckError(f"sandbox at {self.dir} exists without {', '.join(missing)}; "
                              f"run `dbdeck sandbox down` first")
        self.dir.mkdir(parents=True, exist_ok=True)
        data_root = self.dir / "data"
        if os.geteuid() == 0 and not traversable_by_others(self.dir):
            data_root = Path(tempfile.mkdtemp(prefix="dbdeck-sandbox-", dir="/var/tmp"))
        data_root.mkdir(parents=True, exist_ok=True)
        os.chmod(data_root, 0o755)
        state = {"version": STATE_VERSION, "dir": str(self.dir), "data_root": str(data_root), "servers": {}}
        self._save_state(state)
        try:
            for name in ("prod", "dev", FIRST_NODE):
                if name in components or (name == FIRST_NODE and SECOND_NODE in components):
                    self._up_postgres(name, data_root, state, progress)
            if SECOND_NODE in components:
                self._up_standby(data_root, state, progress)
            if "tenant" in components:
                self._up_mariadb(data_root, state, progress)
            if "dev" in components:
                self.server("dev", state).psql(f'CREATE DATABASE "{EXTERNAL_DATABASE}";')
                state["external"] = {"server": "dev", "database": EXTERNAL_DATABASE}
                self._save_state(state)
            if with_containers:
                self._up_containers(state, progress)
            self.write_config(state)
            if sample_data:
                progress("loading sample data")
                self.load_sample_data(state)
        except BaseException:
            progress("start-up failed; stopping what was started")
            self.down()
            raise
        return state

    def _up_postgres(self, name, data_root, state, progress):
        port = free_port()
        progress(f"initdb {name} (PostgreSQL on 127.0.0.1:{port})")
        server = PostgresServer(data_root / name, port, self.runner, socket_dir=_socket_dir(data_root, name))
        password = new_password()
        self._write_secret(name, password)
        server.init(password)
        server.start()
        database = COMPONENTS[name][1]
        server.psql(f'CREATE DATABASE "{database}";')
        if name == FIRST_NODE:
            repl_password = new_password()
            self._write_secret(REPLICATION_USER, repl_password)
            server.psql(f"CREATE ROLE {REPLICATION_USER} WITH REPLICATION LOGIN PASSWORD '{repl_password}';\n"
                        f"SELECT pg_create_physical_replication_slot('{REPLICATION_SLOT}');")
        state["servers"][name] = {"kind": "postgresql", "port": port, "datadir": str(server.datadir),
                                  "socket_dir": str(server.socket_dir), "log": str(server.log_path),
                                  "database": database}
        self._save_state(state)

    def _up_standby(self, data_root, state, progress):
        primary = self.server(FIRST_NODE, state)
        port = free_port()
        progress(f"pg_basebackup {SECOND_NODE} from {FIRST_NODE} (PostgreSQL on 127.0.0.1:{port})")
        standby = primary.make_standby(data_root / SECOND_NODE, port, REPLICATION_USER,
                                       self.password(REPLICATION_USER), slot=REPLICATION_SLOT,
                                       socket_dir=_socket_dir(data_root, SECOND_NODE))
        self._write_secret(SECOND_NODE, self.password(FIRST_NODE))
        standby.start()
        state["servers"][SECOND_NODE] = {"kind": "postgresql", "port": port, "datadir": str(standby.datadir),
                                         "socket_dir": str(standby.socket_dir), "log": str(standby.log_path),
                                         "database": COMPONENTS[SECOND_NODE][1], "standby_of": FIRST_NODE}
        self._save_state(state)

    def _compose(self, *args, check=True, state=None):
        compose = ["docker", "compose"] if self.runner.run(["docker", "compose", "version"], check=False,
                                                          read_only=True).ok else ["docker-compose"]
        prefix = next(iter((state or self.load_state() or {}).get("containers", {}).values()), {}).get(
            "prefix", os.environ.get("DBDECK_SANDBOX_CONTAINER_PREFIX", ""))
        return self.runner.run([*compose, "-p", _project(prefix),
                                "-f", str(SAMPLE_DIR / "containers.yml"), *args], check=check, timeout=300,
                               env={"DBDECK_SANDBOX_CONTAINER_PREFIX": prefix})

    def _up_containers(self, state, progress):
        # DBDECK_SANDBOX_CONTAINER_PREFIX: a prefix for the names, so a sandbox can run beside the seed's
        # own containers (or a test suite's)
        prefix = os.environ.get("DBDECK_SANDBOX_CONTAINER_PREFIX", "")
        names = {name: prefix + container for name, (container, _, _) in CONTAINERS.items()}
        progress(f"docker containers {', '.join(names.values())} (the seeds' `docker exec` way)")
        taken = [c for c in names.values()
                 if self.runner.run(["docker", "inspect", "-f",
                                     "{{ index .Config.Labels \"com.docker.compose.project\" }}",
                                     c], check=False, read_only=True).stdout.strip() not in ("", _project(prefix))]
        if taken:
            raise DbdeckError(f"container(s) {', '.join(taken)} exist and are not the sandbox's; remove them or "
                              f"leave out --with-containers")
        state["containers"] = {name: {"container": names[name], "database": db, "prefix": prefix}
                               for name, (_, db, _) in CONTAINERS.items()}
        self._save_state(state)
        self._compose("up", "-d", state=state)
        import time

        for info in state["containers"].values():
            container, database = info["container"], info["database"]
            deadline = time.monotonic() + 60
            while self._container_sql(container, "SELECT 1", check=False).returncode != 0:
                if time.monotonic() > deadline:
                    raise DbdeckError(f"container {container} did not accept connections within 60s")
                time.sleep(0.3)
            self._container_sql(container, f'CREATE DATABASE "{database}"')

    def _container_sql(self, container, sql, database="postgres", check=True):
        return self.runner.run(["docker", "exec", "-i", container, "psql", "-X", "-q", "-U", "postgres", "-d",
                                database, "-v", "ON_ERROR_STOP=1"], stdin=sql, check=check, timeout=120)

    def _up_mariadb(self, data_root, state, progress):
        port = free_port()
        progress(f"mariadb-install-db tenant (MariaDB on 127.0.0.1:{port})")
        server = MariaDBServer(data_root / "tenant", port, self.runner)
        server.init()
        server.start()
        password = new_password()
        self._write_secret("tenant", password)
        database = COMPONENTS["tenant"][1]
        server.sql(f"CREATE DATABASE `{database}`;\n"
                   f"CREATE USER 'dbdeck'@'127.0.0.1' IDENTIFIED BY '{password}';\n"
                   f"GRANT ALL PRIVILEGES ON *.* TO 'dbdeck'@'127.0.0.1' WITH GRANT OPTION;\n")
        state["servers"]["tenant"] = {"kind": "mysql", "port": port, "datadir": str(server.datadir),
                                      "log": str(server.log_path), "database": database}
        self._save_state(state)

    def write_config(self, state):
        endpoints = {}
        for name, info in state["servers"].items():
            kind, database, role, _ = COMPONENTS[name]
            secret = name if (self.secrets_dir / f"{name}.password").exists() else \
                {v: k for k, v in LEGACY_NAMES.items()}.get(name, name)
            endpoint = {"kind": kind, "host": "127.0.0.1", "port": info["port"],
                        "user": "postgres" if kind == "postgresql" else "dbdeck",
                        "password_file": str(self.secrets_dir / f"{secret}.password"), "database": database}
            if role:
                endpoint["role"] = role
            endpoints[name] = endpoint
        config = {"dbdeck": {"run_dir": str(self.dir / "run"), "log_dir": str(self.dir / "logs"),
                             "state_dir": str(self.dir / "state")},
                  "endpoints": endpoints}
        if "prod" in endpoints and "dev" in endpoints:
            config["sync_prod_to_dev"] = {"source": "prod", "target": "dev"}
        if state.get("external"):
            external = dict(endpoints[state["external"]["server"]], database=state["external"]["database"])
            external.pop("role", None)
            endpoints["external"] = external
            if "prod" in endpoints:
                config["sync_databases"] = {"local": "prod", "external": "external", "tables": ["perfis"]}
        for name, info in (state.get("containers") or {}).items():
            endpoints[name] = {"container": info["container"], "user": "postgres", "database": info["database"],
                               "role": CONTAINERS[name][2]}
        if "prod" in endpoints and "tenant" in endpoints:
            # the sample CRM data's instance 'exatron' lives in the MariaDB tenant database
            config["local_sync"] = {"source": "prod", "instances": [{"name": "exatron", "target": "tenant"}]}
        if FIRST_NODE in endpoints and SECOND_NODE in endpoints:
            servers = state["servers"]
            config["replication"] = {
                "nodes": {name: {"endpoint": name, "driver": "local", "data_dir": servers[name]["datadir"],
                                 "settings": {"port": servers[name]["port"],
                                              "unix_socket_directories": servers[name]["socket_dir"]}}
                          for name in (FIRST_NODE, SECOND_NODE)},
                "primary": FIRST_NODE, "replication_user": REPLICATION_USER, "slot": REPLICATION_SLOT,
                "replication_password_file": str(self.secrets_dir / f"{REPLICATION_USER}.password"),
                "log_dir": str(self.dir / "logs")}
        header = ("# Written by `dbdeck sandbox up`: throwaway servers on 127.0.0.1.\n"
                  f"# Use it with: dbdeck --config {self.config_path} <command>\n")
        self.config_path.write_text(header + yaml.safe_dump(config, sort_keys=False))

    def load_sample_data(self, state):
        scripts = (("prod", "sample_prod.sql"), ("dev", "sample_dev.sql"), (FIRST_NODE, "sample_primary.sql"))
        for name, script in scripts:
            if name in state["servers"]:
                self.server(name, state).psql((SAMPLE_DIR / script).read_text(), database=COMPONENTS[name][1])
        if state.get("external"):
            self.server(state["external"]["server"], state).psql(
                (SAMPLE_DIR / "sample_external.sql").read_text(), database=state["external"]["database"])
        for name, info in (state.get("containers") or {}).items():
            script = "sample_prod.sql" if name == "prod-container" else "sample_dev.sql"
            self._container_sql(info["container"], (SAMPLE_DIR / script).read_text(), database=info["database"])

    def status(self):
        state = self.load_state()
        if not state:
            return None
        rows = []
        for name, info in state["servers"].items():
            server = self.server(name, state)
            row = {"name": name, "kind": info["kind"], "host": "127.0.0.1", "port": info["port"],
                   "database": info["database"], "running": server.is_running(),
                   "description": COMPONENTS[name][3]}
            if info["kind"] == "postgresql" and row["running"]:
                row["in_recovery"] = server.psql("SELECT pg_is_in_recovery();").strip() == "t"
            rows.append(row)
        for name, info in (state.get("containers") or {}).items():
            running = self.runner.run(["docker", "inspect", "-f", "{{.State.Running}}", info["container"]],
                                      check=False, read_only=True).stdout.strip() == "true"
            rows.append({"name": name, "kind": "container", "host": info["container"], "port": None,
                         "database": info["database"], "running": running,
                         "description": f"docker exec {info['container']} (the seeds' way)"})
        return {"dir": str(self.dir), "config": str(self.config_path), "servers": rows}

    def down(self, progress=lambda line: None):
        state = self.load_state()
        if state and state.get("containers"):
            progress("removing the containers")
            self._compose("down", "-v", check=False, state=state)
        if state:
            # standby first, so the primary's shutdown does not wait on a walsender
            for name in sorted(state["servers"], key=lambda n: n != SECOND_NODE):
                progress(f"stopping {name}")
                try:
                    self.server(name, state).destroy()
                except DbdeckError as exc:
                    progress(f"could not stop {name} cleanly: {exc}")
            # a state without data_root (written by an older dbdeck) must not make Path("") the current
            # directory, and rmtree would empty it
            data_root = Path(state["data_root"]) if state.get("data_root") else None
            if data_root is not None and data_root.is_absolute() and data_root.is_dir() \
                    and data_root != self.dir / "data":
                shutil.rmtree(data_root, ignore_errors=True)
        if self.dir.exists():
            shutil.rmtree(self.dir)
        return bool(state)
