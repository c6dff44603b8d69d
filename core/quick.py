"""Quick answers for runs that have nothing to do, without loading the full command line tool.

Most scheduled runs find nothing to do (prod unchanged). The full path (click, every plugin, the
validated config, database drivers) costs several interpreter starts; so when a run ends, the command
can leave a *stamp* for its own command line: the probes that tell the next run has nothing to do (a
query and the answer it must give) and what such a run records. The next start of the same command
line looks for that stamp before importing anything heavy, checks that none of the inputs changed (the
config and env files, the environment, dbdeck's version, the user, the directory), runs the probes and,
when every answer matches, does the bookkeeping and exits. Anything else (no stamp, a changed input, a
probe that fails or answers differently, a lock held, any error) falls through to the full path, which
decides the same way from the same queries and leaves a fresh stamp.

Stamps are a cache (deleting one only costs time) and hold no secret: a password is stored as where it
comes from (a file, an environment variable, a key of an env file), and the inputs prove it unchanged.
Only the full path writes them, and only when the run that wrote them had the same inputs.
"""

import hashlib
import json
import os
import stat
import sys
from pathlib import Path

# set by each run, never part of what configures dbdeck
_VOLATILE_ENV = {"INVOCATION_ID", "JOURNAL_STREAM", "SYSTEMD_EXEC_PID", "MANAGERPID", "LISTEN_PID", "LISTEN_FDS",
                 "LISTEN_FDNAMES", "WATCHDOG_PID", "WATCHDOG_USEC", "TRIGGER_UNIT", "TRIGGER_TIMER_REALTIME_USEC",
                 "TRIGGER_TIMER_MONOTONIC_USEC", "MONITOR_SERVICE_RESULT", "MONITOR_EXIT_CODE",
                 "MONITOR_EXIT_STATUS", "MONITOR_INVOCATION_ID", "MONITOR_UNIT", "_", "OLDPWD", "SHLVL", "PWD"}
_FORMAT = 1
_pending = None  # what the running process will stamp, when it runs as a stampable command line


def cache_dir(root=None):
    """<cache>/dbdeck/quick, private to this user; None when it cannot be trusted (not ours, a symlink,
    readable or writable by others), which only means no quick answers."""
    if root is None and os.geteuid() == 0:
        root = Path("/var/cache/dbdeck")
    elif root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dbdeck"
    directory = Path(root) / "quick"
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = os.lstat(directory)
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        return None
    return directory


def stamp_path(argv, directory=None):
    directory = directory or cache_dir()
    if directory is None:
        return None
    key = hashlib.sha256(json.dumps([os.geteuid(), list(argv)]).encode()).hexdigest()[:32]
    return directory / f"{key}.json"


def digest_bytes(data):
    return hashlib.sha256(data).hexdigest()


def file_digest(path):
    try:
        return digest_bytes(Path(path).read_bytes())
    except OSError:
        return None


def inputs_digest(environ, files):
    """What decides a run besides the databases: dbdeck's version, interpreter, user, directory, the
    environment and the files the config was read from ({path: digest})."""
    from . import __version__

    env = {k: v for k, v in environ.items() if k not in _VOLATILE_ENV}
    document = {"format": _FORMAT, "version": __version__, "python": sys.executable, "uid": os.geteuid(),
                "cwd": os.getcwd(), "env": env, "files": dict(sorted(files.items()))}
    return digest_bytes(json.dumps(document, sort_keys=True).encode())


# --- the quick side: called before anything heavy is imported --------------------------------------
def answer(argv):
    """The exit status when a stamp answers this command line, else None (run the full path)."""
    try:
        path = stamp_path(argv)
        if path is None:
            return None
        stamp = _read_stamp(path)
        if stamp is None or stamp.get("format") != _FORMAT:
            return None
        files = {name: file_digest(name) for name in stamp["files"]}
        if inputs_digest(os.environ, files) != stamp["inputs"]:
            return None
        return _call(stamp["handler"], stamp["data"])
    except Exception:  # noqa: BLE001 - the full path decides and reports; a quick answer is only a shortcut
        return None


def _read_stamp(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd) as source:
        info = os.fstat(source.fileno())
        if info.st_uid != os.geteuid() or info.st_mode & 0o077:
            return None
        return json.load(source)


def _call(handler, data, *args):
    module, function = handler.split(":")
    return getattr(_load(module), function)(data, *args)


def _load(name):
    """Import a handler module. One inside a plugin is loaded on its own, without running its plugin
    package's __init__ (which imports pluggy for the hook markers: more than a quick answer costs), so
    handler modules import only from dbdeck's core and use no relative imports."""
    import importlib

    if name in sys.modules or not name.startswith("dbdeck.plugins."):
        if not name.startswith("dbdeck."):
            raise ValueError(f"not a dbdeck module: {name}")
        return importlib.import_module(name)
    import importlib.util

    import dbdeck.plugins

    parts = name.split(".")[2:]
    path = Path(dbdeck.plugins.__path__[0]).joinpath(*parts[:-1], parts[-1] + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {name} from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def call_inner(data, *args):
    """For a wrapping handler (a scheduled job around a command): call the wrapped command's handler."""
    return _call(data["handler"], data["data"], *args)


# --- the full side: writing stamps --------------------------------------------------------------------
def begin(argv, environ, files, wrapper=None):
    """The running process is the command line argv; a command that ends with nothing left to do may
    stamp it. wrapper=(handler, data) wraps the command's own answer (a scheduled job's bookkeeping)."""
    global _pending
    _pending = {"argv": list(argv), "environ": dict(environ), "files": dict(files), "wrapper": wrapper}
    path = stamp_path(argv)
    if path is not None:
        try:
            path.unlink()  # this run decides anew; a failing run must leave no stamp behind
        except FileNotFoundError:
            pass


def pending():
    return _pending


def offer(handler, data, files=None):
    """Leave a stamp for the running command line: next time, handler(data, say) answers it while
    nothing changed. files: more files the command read its settings from ({path: digest})."""
    if _pending is None:
        return False
    all_files = {**_pending["files"], **(files or {})}
    if None in all_files.values():
        return False
    if _pending["wrapper"]:
        outer_handler, outer_data = _pending["wrapper"]
        handler, data = outer_handler, {**outer_data, "handler": handler, "data": data}
    stamp = {"format": _FORMAT, "argv": _pending["argv"], "files": sorted(all_files),
             "inputs": inputs_digest(_pending["environ"], all_files), "handler": handler, "data": data}
    path = stamp_path(_pending["argv"])
    if path is None:
        return False
    from .state import write_atomic

    write_atomic(path, json.dumps(stamp, indent=1, sort_keys=True), mode=0o600)
    return True


def portable_env(env, password_file=None, env_files=()):
    """Split a client tool's environment into plain values and, for each secret, where it comes from;
    None when a secret's origin cannot be named (then no stamp: the full path runs every time)."""
    from . import secrets

    plain, sources = {}, {}
    for name, value in env.items():
        if not secrets.is_secret_name(name):
            plain[name] = value
            continue
        source = _secret_source(value, password_file, env_files)
        if source is None:
            return None
        sources[name] = source
    return {"env": plain, "secret_env": sources}


def _secret_source(value, password_file, env_files):
    if password_file:
        try:
            if Path(password_file).read_text().rstrip("\r\n") == value:
                return ["file", str(password_file)]
        except OSError:
            pass
    environ = _pending["environ"] if _pending else os.environ
    for name, candidate in sorted(environ.items()):
        if candidate == value:
            return ["env", name]
    for path in env_files:
        from dotenv import dotenv_values

        for key, candidate in dotenv_values(path).items():
            if candidate == value:
                return ["env_file", str(path), key]
    return None


def direct_program(name):
    """The program itself rather than Debian's pg_wrapper (a Perl script that costs more than the
    query): the newest installed client, which is what the wrapper runs for a remote server."""
    import glob
    import shutil

    found = shutil.which(name)
    if found and os.path.basename(os.path.realpath(found)) == "pg_wrapper":
        candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                            key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
        if candidates:
            return candidates[-1]
    return name


def resolve_env(portable):
    """The environment a stamped client tool runs with: plain values plus each secret read again."""
    env = dict(portable["env"])
    for name, source in portable["secret_env"].items():
        kind = source[0]
        if kind == "file":
            env[name] = Path(source[1]).read_text().rstrip("\r\n")
        elif kind == "env":
            env[name] = os.environ[source[1]]
        elif kind == "env_file":
            from dotenv import dotenv_values

            env[name] = dotenv_values(source[1])[source[2]]
        else:
            raise ValueError(f"unknown secret source {kind}")
    return env
