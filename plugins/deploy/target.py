"""Where deploy commands run: the server over SSH (from a CI runner), or this machine.

Every server-side step is one POSIX shell snippet run in the app directory, through the core
Runner (so --dry-run prints it instead, and secrets are masked). Over SSH one master connection is
shared by all steps (ControlMaster), so forty small steps cost one handshake.
"""

import shlex
import tempfile
from pathlib import Path

from dbdeck.errors import CommandFailed, ConfigError, DbdeckError


def quote(*words):
    return " ".join(shlex.quote(str(w)) for w in words)


class Target:
    """A server reachable for shell snippets and as an rsync destination."""

    def __init__(self, runner, path):
        self.runner = runner
        self.path = path

    def sh(self, script, *, stdin=None, check=True, timeout=600, in_app_dir=True, read_only=False):
        """Run a shell snippet on the server, in the app directory unless in_app_dir is False."""
        full = f"cd {shlex.quote(self.path)} && {script}" if in_app_dir else script
        try:
            return self.runner.run(self._argv(full), stdin=stdin, check=check, timeout=timeout, read_only=read_only)
        except CommandFailed as exc:
            raise self._explain(exc) from None

    def _explain(self, exc):
        return exc

    def _argv(self, script):
        raise NotImplementedError

    def rsync_argv(self, source, options):
        raise NotImplementedError

    def describe(self):
        raise NotImplementedError

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LocalTarget(Target):
    """dbdeck runs on the server itself."""

    def _argv(self, script):
        return ["sh", "-c", script]

    def rsync_argv(self, source, options):
        return ["rsync", *options, f"{source}/", f"{self.path}/"]

    def describe(self):
        return f"local:{self.path}"


class SshTarget(Target):
    def __init__(self, runner, path, server):
        super().__init__(runner, path)
        if not server.host:
            raise ConfigError("no server to deploy to: set VPS_HOST (or deploy.server.host), "
                              "or deploy.server.target: local when dbdeck runs on the server")
        self.server = server
        self.destination = f"{server.user}@{server.host}"
        self._control_dir = None

    def ssh_options(self):
        server = self.server
        options = ["-p", str(server.port), "-o", "BatchMode=yes", "-o", f"ConnectTimeout={server.connect_timeout}",
                   "-o", f"StrictHostKeyChecking={server.host_key_checking}", "-o", "ServerAliveInterval=15",
                   "-o", "ServerAliveCountMax=4"]
        if server.key_file:
            options = ["-i", str(Path(server.key_file).expanduser()), "-o", "IdentitiesOnly=yes", *options]
        if server.known_hosts:
            options += ["-o", f"UserKnownHostsFile={Path(server.known_hosts).expanduser()}"]
        if self._control_dir:
            options += ["-o", "ControlMaster=auto", "-o", f"ControlPath={self._control_dir}/%C",
                        "-o", "ControlPersist=120"]
        return options

    def check_files(self):
        for what, path in (("key_file", self.server.key_file), ("known_hosts", self.server.known_hosts)):
            if path and not Path(path).expanduser().is_file():
                raise ConfigError(f"deploy.server.{what}: {path} does not exist")

    def open(self):
        """Share one SSH connection between all steps of this run."""
        if not self.runner.dry_run and self._control_dir is None:
            self._control_dir = tempfile.mkdtemp(prefix="dbdeck-ssh-")
        return self

    def _argv(self, script):
        return ["ssh", *self.ssh_options(), self.destination, script]

    def rsync_argv(self, source, options):
        return ["rsync", *options, "-e", quote("ssh", *self.ssh_options()), f"{source}/",
                f"{self.destination}:{self.path}/"]

    def _explain(self, exc):
        if exc.returncode == 255:  # ssh's own failure: no route, refused, authentication, host key
            lines = (exc.stderr or "").strip().splitlines()
            return DbdeckError(f"cannot reach {self.describe()} over SSH: {lines[-1] if lines else 'ssh failed'}")
        return exc

    def describe(self):
        port = f":{self.server.port}" if self.server.port != 22 else ""
        return f"{self.destination}{port}:{self.path}"

    def close(self):
        if self._control_dir:
            self.runner.run(["ssh", *self.ssh_options(), "-O", "exit", self.destination], check=False, timeout=15,
                            read_only=True)
            import shutil

            shutil.rmtree(self._control_dir, ignore_errors=True)
            self._control_dir = None


def make_target(runner, server, path):
    if not path or not path.startswith("/"):
        raise ConfigError(f"the app directory on the server must be an absolute path (VPS_PATH), got {path!r}")
    if server.target == "local":
        return LocalTarget(runner, path)
    target = SshTarget(runner, path, server)
    target.check_files()
    return target.open()

