"""PostgreSQL nodes: SQL access through an Endpoint, start/stop/files through a driver.

Drivers share one interface:
  is_running()  start()  stop(mode)   the server process (fast = SIGINT, immediate = SIGQUIT)
  shell(script, *args, env, offline)  a POSIX sh script in the node's filesystem, as the server's OS user;
                                      offline=True works while the server is stopped (docker: a helper
                                      container with the node's volumes and network)
  tool(name)                          the path of a PostgreSQL program to run through shell()
  files_on_this_host                  whether shell() sees this host's files (local, systemd); when not
                                      (docker), shell_argv() gives the command line for a pipeline stage
All of it goes through the core Runner, so --dry-run prints instead of running.
"""

import json
import logging
import os
import re
import time
from pathlib import Path

from dbdeck.errors import DbdeckError

log = logging.getLogger("dbdeck.replication")

_STOP_SIGNALS = {"smart": "SIGTERM", "fast": "SIGINT", "immediate": "SIGQUIT"}


class Node:
    def __init__(self, name, config, endpoint, driver):
        self.name = name
        self.config = config
        self.endpoint = endpoint
        self.driver = driver

    @property
    def replication_address(self):
        """(host, port) the other node streams from."""
        if self.config.replication_address:
            host, _, port = self.config.replication_address.rpartition(":")
            return host or self.config.replication_address, int(port or 5432)
        return self.endpoint.host or "127.0.0.1", self.endpoint.port or 5432

    @property
    def app_address(self):
        if self.config.app_address:
            return self.config.app_address
        host, port = self.endpoint.host, self.endpoint.port or 5432
        return f"{host}:{port}" if host else None

    def connect(self, timeout=None, **overrides):
        if timeout is not None:
            overrides["connect_timeout"] = max(1, int(timeout))
        return self.endpoint.connect(**overrides)

    def __repr__(self):
        return f"Node({self.name})"


def make_driver(name, config, runner):
    if config.driver == "docker":
        return DockerDriver(name, config, runner)
    if config.driver == "systemd":
        return SystemdDriver(name, config, runner)
    return LocalDriver(name, config, runner)


def _default_os_user(configured):
    if configured:
        return configured
    return "postgres" if os.geteuid() == 0 else None


def _host_bindir(configured):
    if configured:
        return Path(configured)
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if versions:
        return versions[-1].parent
    import shutil

    found = shutil.which("pg_ctl")
    if not found:
        raise DbdeckError("pg_ctl not found: install the PostgreSQL server package (apt-get install postgresql) "
                          "or set bindir: for the node")
    return Path(found).parent


class HostFiles:
    """shell() and tool() for drivers whose data directory is on this host."""

    files_on_this_host = True

    def shell(self, script, *args, env=None, offline=False, stdin=None, read_only=False, timeout=None,
              passthrough=False):
        argv = ["sh", "-c", script, "sh", *map(str, args)]
        return self.runner.run(argv, env=env, stdin=stdin, as_user=self.os_user, read_only=read_only,
                               timeout=timeout, passthrough=passthrough)

    def tool(self, name):
        return str(self.bindir / name)

    def files_in_use(self):
        return files_in_use(self.data_dir)


def postmaster_alive(data_dir):
    """True/False from postmaster.pid and /proc (a zombie is dead), None when postmaster.pid cannot be read
    (another user's data directory): then pg_ctl has to tell."""
    try:
        pid = int(Path(data_dir, "postmaster.pid").read_text().split()[0])
    except FileNotFoundError:
        return False
    except PermissionError:
        return None
    except (OSError, ValueError, IndexError):
        return False
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    state = re.search(r"^State:\s+(\S)", status, re.M)
    return not (state and state.group(1) in ("Z", "X"))


def wait_until_reaped(data_dir, timeout):
    """A killed postmaster stays a zombie until its parent reaps it (an init that reaps orphans late, a
    container's slow PID 1), and a zombie still answers kill(pid, 0): PostgreSQL then refuses to start
    ("lock file postmaster.pid already exists"). Wait for it to be gone; say who holds it if it stays."""
    try:
        pid = int(Path(data_dir, "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    deadline = time.monotonic() + timeout
    while postmaster_alive(data_dir) is False and Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            try:
                parent = re.search(r"^PPid:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M).group(1)
            except (OSError, AttributeError):
                parent = "?"
            raise DbdeckError(f"the killed postmaster (pid {pid}) of {data_dir} is still a zombie after "
                              f"{timeout} s: its parent (pid {parent}) has not reaped it, and PostgreSQL will not "
                              f"start while that pid exists")
        time.sleep(0.1)


def files_in_use(data_dir):
    """Whether any process still works in the data directory (PostgreSQL's processes run in it): after a
    kill -9 of the postmaster its backends live on for a moment, and a server started meanwhile (or
    pg_rewind's single-user recovery) would share the files with them."""
    data = os.path.realpath(data_dir)
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if os.readlink(entry / "cwd") == data:
                return True
        except OSError:
            continue
    return False


class LocalDriver(HostFiles):
    """A data directory on this host managed with pg_ctl (as the postgres OS user when run as root)."""

    def __init__(self, name, config, runner):
        self.name, self.config, self.runner = name, config, runner
        self.data_dir = str(config.data_dir)
        self.os_user = _default_os_user(config.os_user)
        self.bindir = _host_bindir(config.bindir)
        self.log_file = str(config.log_file or Path(config.data_dir).parent / f"{Path(config.data_dir).name}.log")

    def describe(self):
        return f"local data directory {self.data_dir}"

    def is_running(self):
        alive = postmaster_alive(self.data_dir)
        if alive is None:  # postmaster.pid not readable by us: ask pg_ctl as the server's user
            alive = Path(self.data_dir, "PG_VERSION").exists() and self.runner.run(
                [self.tool("pg_ctl"), "-D", self.data_dir, "status"], as_user=self.os_user, check=False,
                read_only=True).returncode == 0
        return alive or self.files_in_use()

    def start(self, timeout=60):
        if not self.runner.dry_run:
            self._prepare_log_file()
            wait_until_reaped(self.data_dir, timeout)
        self.runner.run([self.tool("pg_ctl"), "-D", self.data_dir, "-l", self.log_file, "-w", "-t", timeout,
                         "start"], as_user=self.os_user, timeout=timeout + 10)

    def _prepare_log_file(self):
        # its directory is often not writable by the server's user: create it for them
        path = Path(self.log_file)
        if not path.exists():
            path.touch(mode=0o640)
            if self.os_user and os.geteuid() == 0:
                import pwd

                entry = pwd.getpwnam(self.os_user)
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def stop(self, mode="fast", timeout=60):
        # a postmaster already dead (killed; maybe not reaped yet) has nothing to stop: pg_ctl would wait
        # for it to remove postmaster.pid, which it never will
        if self.runner.dry_run or postmaster_alive(self.data_dir) is not False:
            self.runner.run([self.tool("pg_ctl"), "-D", self.data_dir, "-m", mode, "-w", "-t", timeout, "stop"],
                            as_user=self.os_user, timeout=timeout + 10)


class SystemdDriver(HostFiles):
    """A server run by a systemd unit (e.g. postgresql@15-main); files on this host."""

    def __init__(self, name, config, runner):
        self.name, self.config, self.runner = name, config, runner
        self.unit = config.unit
        self.data_dir = str(config.data_dir)
        self.os_user = _default_os_user(config.os_user)
        self.bindir = _host_bindir(config.bindir)

    def describe(self):
        return f"systemd unit {self.unit} ({self.data_dir})"

    def is_running(self):
        return self.runner.run(["systemctl", "is-active", "--quiet", self.unit], check=False,
                               read_only=True).returncode == 0 or self.files_in_use()

    def start(self, timeout=60):
        self.runner.run(["systemctl", "start", self.unit], timeout=timeout + 10)

    def stop(self, mode="fast", timeout=60):
        # the unit's own KillSignal decides the shutdown mode; immediate is a SIGQUIT to the main process
        if mode == "immediate":
            self.runner.run(["systemctl", "kill", "--kill-whom=main", "--signal=SIGQUIT", self.unit], check=False)
        self.runner.run(["systemctl", "stop", self.unit], timeout=timeout + 10)


class DockerDriver:
    """A server that is a container's main process; its data directory is inside the container."""

    files_on_this_host = False

    def __init__(self, name, config, runner):
        self.name, self.config, self.runner = name, config, runner
        self.container = config.container
        self.os_user = config.os_user or "postgres"
        self._inspected = None
        self._data_dir = str(config.data_dir) if config.data_dir else None

    def describe(self):
        return f"container {self.container}"

    def _inspect(self):
        if self._inspected is None:
            result = self.runner.run(["docker", "inspect", "--type", "container", self.container], check=False,
                                     read_only=True)
            if result.returncode != 0:
                raise DbdeckError(f"node {self.name}: no container {self.container!r} "
                                  "(" + (result.stderr.strip().splitlines()[-1] if result.stderr.strip()
                                         else "docker inspect failed") + ")")
            self._inspected = json.loads(result.stdout)[0]
        return self._inspected

    @property
    def data_dir(self):
        if self._data_dir is None:
            env = dict(item.split("=", 1) for item in self._inspect()["Config"].get("Env") or [] if "=" in item)
            self._data_dir = env.get("PGDATA", "/var/lib/postgresql/data")
        return self._data_dir

    def is_running(self):
        result = self.runner.run(["docker", "inspect", "-f", "{{.State.Running}}", self.container], check=False,
                                 read_only=True)
        return result.returncode == 0 and result.stdout.strip() == "true"

    def start(self, timeout=60):
        self.runner.run(["docker", "start", self.container], timeout=timeout + 10)

    def stop(self, mode="fast", timeout=60):
        if not self.runner.dry_run and not self.is_running():
            return
        # The container's own stop signal may be SIGTERM (a 'smart' shutdown that waits for every client):
        # send PostgreSQL's signal for the mode, then wait for the container to exit.
        self.runner.run(["docker", "kill", "--signal", _STOP_SIGNALS[mode], self.container], check=False)
        if self.runner.dry_run:
            return
        deadline = time.monotonic() + timeout
        while self.is_running():
            if time.monotonic() > deadline:
                self.runner.run(["docker", "stop", "-t", "10", self.container], timeout=30)
                break
            time.sleep(0.2)

    def shell(self, script, *args, env=None, offline=False, stdin=None, read_only=False, timeout=None,
              passthrough=False):
        return self.runner.run(self.shell_argv(script, *args, env=env, offline=offline), env=env, stdin=stdin,
                               read_only=read_only, timeout=timeout, passthrough=passthrough)

    def shell_argv(self, script, *args, env=None, offline=False):
        """The command line of shell(), for a stage of a Runner pipeline (its env goes with the stage)."""
        forwarded = [flag for name in sorted(env or {}) for flag in ("-e", name)]
        if offline:
            info = self._inspect()
            return ["docker", "run", "--rm", "-i", "--volumes-from", self.container,
                    "--network", info["HostConfig"].get("NetworkMode") or "default", "-u", self.os_user,
                    *forwarded, "--entrypoint", "sh", info["Config"]["Image"], "-c", script, "sh", *map(str, args)]
        return ["docker", "exec", "-i", "-u", self.os_user, *forwarded, self.container,
                "sh", "-c", script, "sh", *map(str, args)]

    def tool(self, name):
        return name  # on the image's PATH
