"""Fixtures that start real servers on 127.0.0.1 (the sandbox plugin's code), and Docker/sshd.

A component that is missing fails the test with the command that installs it: nothing is
silently skipped. `make test` runs scripts/bootstrap first, which installs all of them.
"""

import contextlib
import fcntl
import hashlib
import os
import secrets as token
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dbdeck.config import EndpointConfig
from dbdeck.endpoints import Endpoint
from dbdeck.run import Runner

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "bin"
COMPOSE_DIR = Path(__file__).parent / "integration" / "compose"


def _worker_index():
    """0 for a plain run, N for pytest-xdist's worker gwN."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0


# Everything this suite creates that the machine shares (TCP ports, Docker container, image and compose
# project names) is made private to this checkout and this worker, so the suite runs beside a running
# `make demo` sandbox, beside another checkout's suite, and in parallel workers.
CHECKOUT_TAG = hashlib.sha1(str(ROOT).encode()).hexdigest()[:5]
WORKER_INDEX = _worker_index()
# (set here, not inherited: xdist workers start with the controller's environment)
CONTAINER_PREFIX = f"t{CHECKOUT_TAG}w{WORKER_INDEX}-"
os.environ["DBDECK_TEST_CONTAINER_PREFIX"] = CONTAINER_PREFIX
# 20000-31999 lies below the kernel's ephemeral ports (32768-60999): no outgoing connection takes one.
# Each checkout gets one of six blocks of 2000 ports, each worker 400 of its block.
_PORT_BLOCK = 20000 + int(CHECKOUT_TAG, 16) % 6 * 2000 + WORKER_INDEX % 5 * 400
os.environ["DBDECK_PORT_RANGE"] = f"{_PORT_BLOCK}-{_PORT_BLOCK + 399}"


# The suite's scratch files (pytest's tmp_path, every test server's data directory, dumps, Barman's home)
# go to a RAM filesystem when the machine has one with room: on a VM's disk, writing back ~8 GB of copied
# clusters and WAL cost a third of the suite's CPU. Servers keep their stock settings (fsync stays on); the
# tests kill processes, never the machine, so the page cache holds what a disk would. TMPDIR set by the
# user wins.
_RAM_SCRATCH = Path("/dev/shm")
_RAM_SCRATCH_NEEDED = 4 << 30


def _scratch_dir():
    if os.environ.get("TMPDIR") or os.environ.get("PYTEST_XDIST_WORKER"):
        return None  # the user's choice; xdist workers inherit the controller's
    try:
        room = os.statvfs(_RAM_SCRATCH)
    except OSError:
        return None
    if room.f_bavail * room.f_frsize < _RAM_SCRATCH_NEEDED:
        return None
    path = _RAM_SCRATCH / f"dbt-{CHECKOUT_TAG}"  # short: unix socket paths are limited to 107 bytes
    path.mkdir(exist_ok=True)
    os.chmod(path, 0o1777)  # like /tmp: servers and tools that run as other users create files here too
    return path


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    scratch = _scratch_dir()
    if scratch is not None:
        os.environ["TMPDIR"] = str(scratch)
        tempfile.tempdir = None  # re-read TMPDIR


@contextlib.contextmanager
def machine_wide(resource):
    """Held while a test uses what only one test on this machine can use at a time (root's crontab and the
    cron daemon): other workers and other checkouts' suites wait for it (in /tmp, which all of them share,
    whatever their TMPDIR)."""
    with open(Path("/tmp") / f"dbdeck-tests-{resource}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def require(program, package):
    if shutil.which(program) is None and not Path("/usr/sbin", program).exists():
        pytest.fail(f"{program} is not installed: run `make test` (scripts/bootstrap) or apt-get install {package}",
                    pytrace=False)


def new_password():
    # includes characters that need quoting in a DSN, to prove they are passed safely
    return token.token_urlsafe(12) + "'\" x@:/"


@pytest.fixture(scope="session")
def workdir():
    """A scratch directory the postgres and mysql OS users can traverse (pytest's tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="dbdeck-test-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def runner():
    return Runner()


def default_signals():
    """preexec_fn for a program a test stops with SIGINT/SIGTERM: both at their defaults and deliverable, as
    a terminal's foreground job has them, whatever state the test worker is in."""
    import signal

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


@pytest.fixture(autouse=True)
def _signals_deliverable_after_each_test():
    """A command run in-process ends by blocking SIGTERM (hold_termination), as a real run does just before
    it exits. In a test worker that block would outlive the test: every program a later test starts
    itself would inherit it, and a SIGTERM the test sends it would never arrive."""
    yield
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})


def endpoint(name, port, password, database, kind="postgresql", user=None, runner=None, **extra):
    config = EndpointConfig(kind=kind, host="127.0.0.1", port=port, password=password, database=database,
                            user=user or ("postgres" if kind == "postgresql" else "dbdeck"), **extra)
    return Endpoint(name, config, runner or Runner())


class StartedPostgres:
    def __init__(self, server, password):
        self.server = server
        self.password = password
        self.port = server.port

    def endpoint(self, database="postgres", name="pg", runner=None, **extra):
        return endpoint(name, self.port, self.password, database, runner=runner, **extra)


_initdb_template: list[Path] = []   # this process's stopped, just-initdb'd cluster


def _cluster_from_template(server):
    """server's data directory as initdb would leave it, copied from one initdb per test process: a copy
    is several times faster than initdb, and the result is the same stock cluster."""
    from dbdeck.plugins.sandbox.servers import PostgresServer, give_to

    if not _initdb_template:
        root = Path(tempfile.mkdtemp(prefix="dbdeck-initdb-"))
        os.chmod(root, 0o755)
        template = PostgresServer(root / "data", 1, Runner(), socket_dir=root / "run")
        template.initdb(new_password())
        _initdb_template.append(template.datadir)
    server.datadir.parent.mkdir(parents=True, exist_ok=True)
    give_to(server.socket_dir, server.os_user, 0o700)
    subprocess.run(["cp", "-a", "--no-target-directory", str(_initdb_template[0]), str(server.datadir)], check=True)


@pytest.fixture(scope="session", autouse=True)
def _remove_initdb_template():
    yield
    for datadir in _initdb_template:
        shutil.rmtree(datadir.parent, ignore_errors=True)


def _start_postgres(workdir, name, settings=None, stock=False):
    from psycopg import sql

    from dbdeck.plugins.sandbox.servers import PostgresServer, free_port

    require("pg_ctl", "postgresql")
    password = new_password()
    server = PostgresServer(workdir / name, free_port(), Runner(), socket_dir=workdir / f"{name}.run")
    _cluster_from_template(server)
    server.configure(server.initial_settings(settings, stock))
    server.start()
    server.psql(sql.SQL("ALTER ROLE {} PASSWORD {};").format(
        sql.Identifier(server.superuser), sql.Literal(password)).as_string(None) + "\n")
    return StartedPostgres(server, password)


@pytest.fixture(scope="session")
def pg_server(workdir):
    """A running PostgreSQL cluster; .endpoint(database) gives a dbdeck Endpoint to it."""
    started = _start_postgres(workdir, "pg")
    yield started
    started.server.destroy()


@pytest.fixture(scope="session")
def pg_pair(workdir):
    """A streaming-replication primary and hot standby (pg_basebackup -R, physical slot)."""
    primary = _start_postgres(workdir, "primary")
    repl_password = new_password().replace("'", "")
    primary.server.psql(f"CREATE ROLE replicator REPLICATION LOGIN PASSWORD '{repl_password}';\n"
                        "SELECT pg_create_physical_replication_slot('replica_slot');")
    from dbdeck.plugins.sandbox.servers import free_port

    standby_server = primary.server.make_standby(workdir / "standby", free_port(), "replicator", repl_password,
                                                 slot="replica_slot", socket_dir=workdir / "standby.run")
    standby_server.start()
    standby = StartedPostgres(standby_server, primary.password)
    yield primary, standby
    standby_server.destroy()
    primary.server.destroy()


class StartedMariaDB:
    def __init__(self, server, password):
        self.server = server
        self.password = password
        self.port = server.port

    def endpoint(self, database="tenant", name="tenant", runner=None, **extra):
        return endpoint(name, self.port, self.password, database, kind="mysql", runner=runner, **extra)


@pytest.fixture(scope="session")
def mariadb_server(workdir):
    """A running MariaDB server with user `dbdeck` (all privileges) and database `tenant`."""
    from dbdeck.plugins.sandbox.servers import MariaDBServer, free_port

    require("mariadbd", "mariadb-server")
    server = MariaDBServer(workdir / "mariadb", free_port(), Runner())
    server.init()
    server.start()
    password = new_password().replace("'", "").replace('"', "")
    server.sql(f"CREATE DATABASE tenant;\nCREATE USER 'dbdeck'@'127.0.0.1' IDENTIFIED BY '{password}';\n"
               "GRANT ALL PRIVILEGES ON *.* TO 'dbdeck'@'127.0.0.1';\n")
    yield StartedMariaDB(server, password)
    server.destroy()


# --- Docker through pytest-docker -------------------------------------------------------------------

def _docker_ready():
    require("docker", "docker.io")
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.fail("dockerd is not running: run scripts/bootstrap (it starts dockerd)", pytrace=False)
    if subprocess.run(["docker", "image", "inspect", "dbdeck-base:latest"], capture_output=True).returncode:
        pytest.fail("image dbdeck-base:latest is missing: run scripts/build-base-image", pytrace=False)


@pytest.fixture(scope="session")
def docker_compose_command():
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return "docker compose"
    require("docker-compose", "docker-compose")
    return "docker-compose"


@pytest.fixture(scope="session")
def docker_setup(docker_compose_command):
    # `--wait` exists only in compose v2; readiness is checked by the fixtures themselves
    return ["up --build -d"]


@pytest.fixture(scope="session")
def docker_compose_file():
    return str(COMPOSE_DIR / "crm-postgres.yml")


@pytest.fixture(scope="session")
def docker_compose_project_name():
    return f"dbdeck-tests-{os.getpid()}"


@pytest.fixture(scope="session")
def crm_containers(docker_services_ready):
    """The seeds' crm-postgres and crm-postgres-dev containers, reachable only by docker exec."""
    names = {"prod": f"{CONTAINER_PREFIX}crm-postgres", "dev": f"{CONTAINER_PREFIX}crm-postgres-dev"}
    for container in names.values():
        docker_services_ready.wait_until_responsive(
            check=lambda c=container: subprocess.run(["docker", "exec", c, "pg_isready", "-U", "postgres"],
                                                     capture_output=True).returncode == 0,
            timeout=60, pause=0.3)
    return names


@pytest.fixture(scope="session")
def docker_services_ready(request):
    _docker_ready()
    # what an interrupted earlier run of this checkout's worker left (its names are this worker's alone)
    leftovers = subprocess.run(["docker", "ps", "-aq", "--filter", f"name=^/{CONTAINER_PREFIX}"],
                               capture_output=True, text=True).stdout.split()
    if leftovers:
        subprocess.run(["docker", "rm", "-f", *leftovers], capture_output=True)
    return request.getfixturevalue("docker_services")


# --- sshd on loopback -------------------------------------------------------------------------------

class Sshd:
    def __init__(self, port, key, known_hosts, user):
        self.port = port
        self.key = key
        self.known_hosts = known_hosts
        self.user = user

    def ssh_argv(self, *command):
        return ["ssh", "-p", str(self.port), "-i", str(self.key), "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", f"{self.user}@127.0.0.1", *command]


@pytest.fixture(scope="session")
def sshd(workdir):
    """An sshd on a loopback port accepting a generated key for the current user."""
    from dbdeck.plugins.sandbox.servers import free_port, wait_until

    require("sshd", "openssh-server")
    require("ssh", "openssh-client")
    base = workdir / "sshd"
    base.mkdir(mode=0o700)
    host_key, user_key = base / "host_ed25519", base / "id_ed25519"
    for key in (host_key, user_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    authorized = base / "authorized_keys"
    authorized.write_text(Path(f"{user_key}.pub").read_text())
    os.chmod(authorized, 0o600)
    port = free_port()
    config = base / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nAuthorizedKeysFile {authorized}\n"
        f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        f"StrictModes no\nUsePAM no\nPidFile {base}/sshd.pid\nSubsystem sftp internal-sftp\n"
        # bash reads ~/.bashrc for a command sent over ssh only as the session's first shell (SHLVL unset);
        # this machine's root .bashrc runs `pyenv init` (0.16 s of CPU, ~50 processes) for each command the
        # deploy tests send. What the remote user's shell does at start-up is not what these tests are about.
        f"SetEnv SHLVL=1\n")
    Path("/run/sshd").mkdir(exist_ok=True)
    known_hosts = base / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {Path(f'{host_key}.pub').read_text()}")
    sshd_path = shutil.which("sshd") or "/usr/sbin/sshd"
    process = subprocess.Popen([sshd_path, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL,
                               stderr=open(base / "sshd.log", "wb"))
    import pwd

    server = Sshd(port, user_key, known_hosts, pwd.getpwuid(os.getuid()).pw_name)

    def answers():
        return subprocess.run(server.ssh_argv("true"), capture_output=True, timeout=10).returncode == 0

    try:
        wait_until(answers, 20, f"sshd on port {port} (log {base}/sshd.log)")
        yield server
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def dbdeck_bin():
    """Run bin/<command> as a user would; returns a function -> CompletedProcess."""

    def run(*args, command="dbdeck", env=None, cwd=None, input=None, timeout=120):
        return subprocess.run([str(BIN / command), *map(str, args)], capture_output=True, text=True,
                              env={**os.environ, **(env or {})}, cwd=cwd, input=input, timeout=timeout)

    return run


def first_json_document(process, timeout=30.0):
    """Read a service's stdout (text mode) line by line until it holds one whole JSON document; returns it,
    or None when the process ended or the time ran out first."""
    import json

    text, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        text += process.stdout.readline()
        try:
            return json.loads(text)
        except ValueError:
            continue
    return None


def wait_for(check, timeout=10.0, pause=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(pause)
    return False


# the files holding the suite's one- to two-minute tests (see the durations that `bash .ci/run` prints)
LONGEST_FILES = {"test_pitr.py", "test_patroni.py", "test_replication_stock.py", "test_replication_docker.py",
                 "test_deploy.py"}


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Under --dist loadgroup, a test marked xdist_group must carry its group in its node id, which is how
    xdist keeps a group on one worker. A pytest/xdist pair that drops it (pytest 9.2, xdist issue 1386)
    would split module-scoped servers across workers and fail at random: stop at once instead."""
    if not getattr(config.option, "loadgroup", False):
        return
    # Longest first (the scheduling rule that packs best): xdist hands out tests in this order, so the
    # one- to two-minute tests start at once instead of being last to finish, and the quick unit tests
    # fill the end of the run.
    items.sort(key=lambda item: 0 if item.path.name in LONGEST_FILES else 1 if "integration" in item.path.parts
               else 2)
    lost = [item.nodeid for item in items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if lost:
        message = (f"pytest-xdist did not group {len(lost)} test(s) marked xdist_group (e.g. {lost[0]}): this "
                   "pytest and pytest-xdist do not work together; install the versions setup.cfg names")
        sys.__stderr__.write(f"\n{message}\n")  # a worker's exit reason alone reaches the terminal as an INTERNALERROR
        pytest.exit(message, returncode=3)
