"""Throwaway PostgreSQL and MariaDB servers on 127.0.0.1, for the sandbox, the demo and the tests.

As root the servers run as the `postgres` and `mysql` OS users, as Debian's packages expect.
All programs run through dbdeck's Runner.
"""

import os
import pwd
import random
import shutil
import signal
import socket
import stat
import time
from pathlib import Path

from dbdeck.errors import DbdeckError
from dbdeck.run import Runner

_SOCKET_PATH_MAX = 100


PORT_RANGE_VARIABLE = "DBDECK_PORT_RANGE"
_handed_out: set[int] = set()


def _port_range():
    """DBDECK_PORT_RANGE=FIRST-LAST, or None: the kernel's choice of an ephemeral port."""
    value = os.environ.get(PORT_RANGE_VARIABLE, "").strip()
    if not value:
        return None
    try:
        first, last = (int(part) for part in value.split("-"))
    except ValueError:
        raise DbdeckError(f"{PORT_RANGE_VARIABLE}={value!r}: expected FIRST-LAST, e.g. 21000-21399") from None
    if not 1024 <= first <= last <= 65535:
        raise DbdeckError(f"{PORT_RANGE_VARIABLE}={value!r}: expected 1024 <= FIRST <= LAST <= 65535")
    return first, last


def _bindable(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port():
    """A TCP port free on 127.0.0.1. With DBDECK_PORT_RANGE set (parallel test workers each get their own),
    one from that range that this process has not handed out before, so that two servers being set up side
    by side never get the same port."""
    bounds = _port_range()
    if bounds is None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    first, last = bounds
    candidates = [port for port in range(first, last + 1) if port not in _handed_out]
    random.shuffle(candidates)
    for port in candidates:
        if _bindable(port):
            _handed_out.add(port)
            return port
    raise DbdeckError(f"no free port left in {PORT_RANGE_VARIABLE}={first}-{last}")


def os_user_for(name):
    """The OS user a server should run as: `name` when we are root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise DbdeckError(f"OS user {name!r} does not exist; install the server package "
                          f"(apt-get install {'postgresql' if name == 'postgres' else 'mariadb-server'})") from None
    return name


def give_to(path, user, mode):
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if user:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    os.chmod(path, mode)
    return path


def traversable_by_others(path):
    """Whether every directory above path lets other users (postgres, mysql) pass through."""
    path = Path(path).resolve()
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.stat().st_mode & stat.S_IXOTH:
            return False
    return True


def postgres_bindir():
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if versions:
        return versions[-1].parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise DbdeckError("PostgreSQL server programs (initdb, pg_ctl) not found; install them with: "
                      "apt-get install postgresql")


def wait_until(check, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() > deadline:
            raise DbdeckError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def fits_a_unix_socket(directory):
    """Whether PostgreSQL's socket (and its .lock) in directory stays within a unix socket path's limit."""
    return len(str(directory)) <= _SOCKET_PATH_MAX - 20


class PostgresServer:
    """A cluster in its own data directory, managed with initdb/pg_ctl."""

    kind = "postgresql"

    def __init__(self, datadir, port, runner=None, os_user="auto", socket_dir=None, superuser="postgres"):
        self.datadir = Path(datadir)
        self.port = int(port)
        self.runner = runner or Runner()
        self.os_user = os_user_for("postgres") if os_user == "auto" else os_user
        self.socket_dir = Path(socket_dir) if socket_dir else self.datadir.parent / f"{self.datadir.name}.run"
        if not fits_a_unix_socket(self.socket_dir):
            raise DbdeckError(f"socket directory path too long for a unix socket: {self.socket_dir}")
        self.superuser = superuser
        self.bindir = postgres_bindir()
        self.log_path = self.datadir.parent / f"{self.datadir.name}.log"

    def _tool(self, name):
        return str(self.bindir / name)

    def _run(self, argv, **kwargs):
        return self.runner.run(argv, as_user=self.os_user, **kwargs)

    def init(self, password, settings=None, stock=False):
        """initdb with a superuser password (scram for TCP, trust on the private unix socket).

        stock=True keeps PostgreSQL's defaults except where it listens (what a user's server has): the
        replication tests build pairs from that plus only what the README tells users to set."""
        self.initdb(password)
        self.configure(self.initial_settings(settings, stock))

    def initdb(self, password):
        """The cluster as initdb leaves it, with nothing configured yet."""
        self.datadir.parent.mkdir(parents=True, exist_ok=True)
        give_to(self.datadir, self.os_user, 0o700)
        give_to(self.socket_dir, self.os_user, 0o700)
        pwfile = self.socket_dir / "initdb.pw"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(password + "\n")
        if self.os_user:
            entry = pwd.getpwnam(self.os_user)
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        try:
            self._run([self._tool("initdb"), "-D", self.datadir, "-U", self.superuser, f"--pwfile={pwfile}",
                       "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8",
                       "--no-sync"], timeout=120)
        finally:
            pwfile.unlink(missing_ok=True)

    def initial_settings(self, settings=None, stock=False):
        """Where the server listens, plus (unless stock) what the sandbox tunes for a quick demo."""
        where = {"listen_addresses": "'127.0.0.1'", "port": self.port,
                 "unix_socket_directories": f"'{self.socket_dir}'"}
        if stock:
            return {**where, **(settings or {})}
        base = {
            **where, "wal_level": "replica", "max_wal_senders": 10, "max_replication_slots": 10, "hot_standby": "on",
            "wal_log_hints": "on", "wal_keep_size": "'64MB'", "fsync": "off", "synchronous_commit": "on",
            "shared_buffers": "'64MB'", "max_connections": 50,
        }
        return {**base, **(settings or {})}

    def configure(self, settings):
        """Append settings to postgresql.conf (later lines win)."""
        lines = "".join(f"{key} = {value}\n" for key, value in settings.items())
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.write("\n# dbdeck sandbox\n" + lines)

    def start(self, timeout=60):
        self.log_path.touch(exist_ok=True)
        if self.os_user:
            entry = pwd.getpwnam(self.os_user)
            os.chown(self.log_path, entry.pw_uid, entry.pw_gid)
        self._run([self._tool("pg_ctl"), "-D", self.datadir, "-l", self.log_path, "-w", "-t", timeout, "start"],
                  timeout=timeout + 10)

    def stop(self, mode="fast", timeout=60):
        if self.is_running():
            self._run([self._tool("pg_ctl"), "-D", self.datadir, "-m", mode, "-w", "-t", timeout, "stop"],
                      timeout=timeout + 10)

    def is_running(self):
        if not (self.datadir / "PG_VERSION").exists():
            return False
        return self._run([self._tool("pg_ctl"), "-D", self.datadir, "status"], check=False,
                         read_only=True).returncode == 0

    def psql(self, sql, database="postgres"):
        """Run SQL as the superuser over the private unix socket; returns stdout."""
        return self._run([self._tool("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                          "-h", self.socket_dir, "-p", self.port, "-U", self.superuser, "-d", database],
                         stdin=sql).stdout

    def make_standby(self, datadir, port, replication_user, replication_password, slot=None, socket_dir=None):
        """Clone this server with pg_basebackup into a new standby (not started). Its password goes in a
        passfile where dbdeck's replication commands keep theirs, not in primary_conninfo (pg_basebackup -R
        would put it there, so in the server log on reload and in every base backup of the standby)."""
        standby = PostgresServer(datadir, port, self.runner, self.os_user, socket_dir, self.superuser)
        give_to(standby.datadir, self.os_user, 0o700)
        give_to(standby.socket_dir, self.os_user, 0o700)
        argv = [self._tool("pg_basebackup"), "-h", "127.0.0.1", "-p", self.port, "-U", replication_user,
                "-D", standby.datadir, "-X", "stream", "-c", "fast", "--no-sync"]
        if slot:
            argv += ["-S", slot]
        self._run(argv, env={"PGPASSWORD": replication_password}, timeout=300)
        passfile = "pg_replslot/dbdeck-replication-sandbox.pgpass"
        escaped = replication_password.replace("\\", "\\\\").replace(":", "\\:")
        for name, text, mode in ((passfile, f"*:*:*:{replication_user}:{escaped}\n", 0o600),
                                 ("standby.signal", "", 0o600)):
            path = standby.datadir / name
            path.write_text(text)
            os.chmod(path, mode)
            if self.os_user:
                entry = pwd.getpwnam(self.os_user)
                os.chown(path, entry.pw_uid, entry.pw_gid)
        conninfo = f"host=127.0.0.1 port={self.port} user={replication_user} passfile={passfile}"
        standby.configure({"port": port, "unix_socket_directories": f"'{standby.socket_dir}'",
                           "primary_conninfo": f"'{conninfo}'", **({"primary_slot_name": f"'{slot}'"} if slot else {})})
        return standby

    def destroy(self):
        self.stop(mode="immediate")
        for path in (self.datadir, self.socket_dir):
            shutil.rmtree(path, ignore_errors=True)
        self.log_path.unlink(missing_ok=True)


class MariaDBServer:
    """A MariaDB (or MySQL) server in its own data directory: mariadb-install-db + mariadbd."""

    kind = "mysql"

    def __init__(self, datadir, port, runner=None, os_user="auto"):
        self.datadir = Path(datadir)
        self.port = int(port)
        self.runner = runner or Runner()
        self.os_user = os_user_for("mysql") if os_user == "auto" else os_user
        self.run_dir = self.datadir.parent / f"{self.datadir.name}.run"
        self.socket = self.run_dir / "mysqld.sock"
        self.pid_file = self.run_dir / "mysqld.pid"
        self.log_path = self.datadir.parent / f"{self.datadir.name}.log"
        for program in ("mariadb-install-db", "mariadbd"):
            if not (shutil.which(program) or Path("/usr/sbin", program).exists()):
                raise DbdeckError(f"{program} not found; install it with: apt-get install mariadb-server")

    def _client(self, *args):
        # root authenticates by unix_socket as the OS root user, or with an empty password as non-root
        return ["mariadb", "--no-defaults", f"--socket={self.socket}", "--user=root", *args]

    def init(self):
        give_to(self.datadir, self.os_user, 0o750)
        give_to(self.run_dir, self.os_user, 0o750)
        argv = ["mariadb-install-db", "--no-defaults", f"--datadir={self.datadir}", "--skip-test-db",
                "--auth-root-authentication-method=" + ("socket" if os.geteuid() == 0 else "normal")]
        if self.os_user:
            argv.append(f"--user={self.os_user}")
        self.runner.run(argv, timeout=180)

    def start(self, timeout=60, options=()):
        """Start mariadbd; options are extra server flags (later ones win, e.g. a bigger buffer pool)."""
        mariadbd = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
        argv = [mariadbd, "--no-defaults", f"--datadir={self.datadir}", f"--port={self.port}",
                "--bind-address=127.0.0.1", f"--socket={self.socket}", f"--pid-file={self.pid_file}",
                # its own temporary tables beside its socket: not in a $TMPDIR other programs share and clean
                f"--tmpdir={self.run_dir}",
                "--skip-name-resolve", "--innodb-buffer-pool-size=64M", "--innodb-flush-log-at-trx-commit=2",
                "--character-set-server=utf8mb4", "--collation-server=utf8mb4_unicode_ci", *options]
        if self.os_user:
            argv.append(f"--user={self.os_user}")
        self.runner.start_daemon(argv, log_path=self.log_path)
        wait_until(self.is_running, timeout, f"MariaDB on port {self.port} (log: {self.log_path})")

    def is_running(self):
        if not self.socket.exists():
            return False
        return self.runner.run(self._client("-e", "SELECT 1"), check=False, read_only=True,
                               timeout=10).returncode == 0

    def sql(self, statements):
        return self.runner.run(self._client("--batch", "--skip-column-names"), stdin=statements, timeout=60).stdout

    def stop(self, timeout=60):
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        wait_until(lambda: not _alive(pid), timeout, f"MariaDB (pid {pid}) to stop")

    def destroy(self):
        self.stop()
        for path in (self.datadir, self.run_dir):
            shutil.rmtree(path, ignore_errors=True)
        self.log_path.unlink(missing_ok=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie of ours still answers kill(0); reap it if it is our child
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        return waited == 0
    except ChildProcessError:
        return True
