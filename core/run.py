"""The one place where dbdeck runs external programs.

Every pg_dump, psql, docker, rsync or ssh call goes through Runner.run(), which

* passes secrets through the environment or stdin, never argv;
* in dry-run mode prints the command (secrets masked) instead of running it, unless the caller
  declares the command read-only (pre-checks still run in a dry run);
* applies a timeout;
* turns failures into CommandFailed with the command line and stderr masked: sh's own exception
  text contains the full command line, so it is never re-raised as is.
"""

import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from . import secrets
from .errors import CommandFailed, CommandTimeout

log = logging.getLogger("dbdeck.run")

_STDERR_TAIL_CHARS = 2000

_children_lock = threading.Lock()
_children: set[int] = set()  # pids of the programs this process runs and waits for right now


def stop_children(signum: int = signal.SIGTERM) -> None:
    """Pass a stop on to every program we are waiting for (called when dbdeck itself is told to stop,
    before its own cleanup runs, so a DROP of a staging database does not race a pg_restore)."""
    with _children_lock:
        pids = list(_children)
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def hold_termination() -> None:
    """From here on, a SIGTERM waits (pending) until the process ends: the command has passed a point where
    stopping would leave more to repair than finishing (a swap committed, a run's work done). Only the main
    thread receives signals, so elsewhere this does nothing."""
    if threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


class _StopsDeferred:
    """While a program is being started, a Ctrl-C or SIGTERM waits until its pid is known and tracked.
    Otherwise the stop could unwind us between the fork and the pid (the program is then stopped by
    nobody), and dbdeck could even exit before the child had set its parent-death signal: a `sleep`,
    `pg_dump`... running on for nobody, holding our output pipes open.

    The program also starts with both signals deliverable: a child inherits the signal mask of the thread
    that forks it, and once hold_termination() blocked SIGTERM, every program started after it (a server,
    a receiver) could never be stopped by one. A SIGTERM being held stays held: it is caught here while
    unblocked, and raised again once the mask is back, which leaves it pending.

    Main thread only (the only one Python lets set handlers); elsewhere this does nothing."""

    _SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.active = threading.current_thread() is threading.main_thread()
        if self.active:
            self.arrived: list[int] = []
            self.previous = [signal.signal(signum, lambda signum, _: self.arrived.append(signum))
                             for signum in self._SIGNALS]
            self.mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, self._SIGNALS)
        return self

    def __exit__(self, error_type, *_):
        if not self.active:
            return
        signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
        for signum, handler in zip(self._SIGNALS, self.previous):
            signal.signal(signum, handler)
        if error_type is not None:  # nothing started: the stop can act at once
            self.deliver()

    def deliver(self):
        """Raise what arrived meanwhile, to the handlers put back: call it where the started program is
        stopped on the way out. (A blocked signal stays pending: held, as it was.)"""
        if self.active:
            arrived, self.arrived = dict.fromkeys(self.arrived), []
            for signum in arrived:
                signal.raise_signal(signum)


def _track(pid):
    with _children_lock:
        _children.add(pid)


def _untrack(pid):
    with _children_lock:
        _children.discard(pid)


def _tied_to_us(argv, env=None):
    """argv resolved and run through `setpriv --pdeathsig TERM`: if dbdeck dies, even by kill -9, the
    kernel sends the program SIGTERM, so no pg_dump or pg_restore goes on working for nobody.
    (The signal is not inherited by the program's own children: a postmaster that pg_ctl starts, or a
    container, lives on as intended.) Raises CommandFailed when the program is not found."""
    path = (env or {}).get("PATH") or os.environ.get("PATH")
    program = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=path)
    if not program or not os.access(program, os.X_OK):
        raise CommandFailed(f"program not found: {argv[0]} (is it installed and on PATH?)", argv=argv, returncode=127)
    setpriv = _setpriv()
    return [setpriv, "--pdeathsig", "TERM", "--", program, *argv[1:]] if setpriv else [program, *argv[1:]]


_setpriv_path: list[str | None] = []


def _setpriv():
    if not _setpriv_path:
        _setpriv_path.append(shutil.which("setpriv"))
    return _setpriv_path[0]


@dataclass
class Result:
    argv: list
    returncode: int = 0
    stdout: str = ""
    stderr: str = ""
    dry_run: bool = False

    @property
    def ok(self):
        return self.returncode == 0


@dataclass
class Daemon:
    """A long-running program started with Runner.start_daemon()."""

    argv: list
    pid: int
    log_path: Path | None = None
    _popen: subprocess.Popen | None = field(default=None, repr=False)

    def poll(self):
        """The exit status once the program ended (negative: killed by that signal), else None."""
        return self._popen.poll() if self._popen else None

    def send_signal(self, signum):
        if self._popen and self._popen.poll() is None:
            self._popen.send_signal(signum)

    def wait(self, timeout=None):
        return self._popen.wait(timeout) if self._popen else None


class Session:
    """A program started with Runner.open_session(): write lines to it, read its answers."""

    def __init__(self, argv, env, popen, errors):
        self.argv, self.env, self._popen, self._errors = argv, env, popen, errors

    def send(self, text):
        try:
            self._popen.stdin.write(text.encode())
            self._popen.stdin.flush()
        except BrokenPipeError:
            self._fail("ended early")

    def read_line(self, timeout=30):
        """The next line of output (without the newline); fails if the program ends or stays silent."""
        import select

        ready, _, _ = select.select([self._popen.stdout], [], [], timeout)
        if not ready:
            self._fail(f"gave no answer within {timeout}s")
        line = self._popen.stdout.readline()
        if not line:
            self._popen.wait()
            self._fail(f"ended with exit status {self._popen.returncode}")
        return line.decode("utf-8", errors="replace").rstrip("\n")

    def _fail(self, what):
        self._errors.seek(0)
        stderr = _decode(self._errors.read())
        self.close()
        raise CommandFailed(f"{printable(self.argv, self.env)} {what}{_tail(stderr)}", argv=self.argv,
                            returncode=self._popen.returncode, stderr=secrets.mask(stderr))

    def close(self, timeout=10):
        """Close its input (a psql session then ends, rolling back an open transaction) and reap it."""
        if self._popen.poll() is None:
            try:
                self._popen.stdin.close()
                self._popen.wait(timeout)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self._popen.kill()
                self._popen.wait()
        self._errors.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def dbdeck_argv(*command):
    """How dbdeck starts itself (installed jobs, the scheduler, the daemonised monitor): this interpreter
    with -P, so the working directory is never searched for code (a `dbdeck/` there would run as root)."""
    return [sys.executable, "-P", "-m", "dbdeck.launch", *command]


def printable(argv, env=None):
    """A shell-quoted, masked rendering of a command, with the names (only) of extra variables."""
    line = " ".join(shlex.quote(str(a)) for a in argv)
    if env:
        shown = (f"{k}=***" if secrets.is_secret_name(k) else f"{k}={shlex.quote(str(v))}"
                 for k, v in sorted(env.items()))
        line = " ".join(shown) + " " + line
    return secrets.mask(line)


class Runner:
    """Runs external commands; one instance per invocation, carrying the dry-run flag."""

    def __init__(self, dry_run: bool = False, echo: Callable[[str], Any] | None = None,
                 default_timeout: float | None = None) -> None:
        self.dry_run = dry_run
        self.default_timeout = default_timeout
        self._echo = echo or (lambda line: print(line, flush=True))

    def say(self, message: str) -> None:
        """Print one dry-run line (or a plan step) the way every command does."""
        self._echo(f"[dry-run] {secrets.mask(message)}" if self.dry_run else secrets.mask(message))

    def run(self, argv: Sequence[Any], *, env: Mapping[str, str] | None = None, stdin: Any = None,
            stdout: IO[bytes] | None = None, timeout: float | None = None, cwd: str | Path | None = None,
            as_user: str | None = None, check: bool = True, read_only: bool = False, binary: bool = False,
            passthrough: bool = False, output: IO[bytes] | None = None, echo: bool = False) -> Result:
        """Run argv and wait for it.

        env      extra variables (secrets go here, e.g. PGPASSWORD); merged over os.environ
        stdin    str/bytes or an open file passed to the program's standard input
        stdout   an open binary file to stream standard output into instead of capturing it
        as_user  run as this OS user (through runuser) when dbdeck runs as root
        read_only  the command changes nothing, so it also runs in a dry run
        passthrough  the program writes straight to our stdout/stderr
        output   an open binary file that receives stdout and stderr interleaved (a scheduled job's log);
                 with echo, the same bytes are also copied to our stdout (a terminal, journald)
        """
        argv = [str(a) for a in argv]
        if as_user and os.geteuid() == 0:
            argv = ["runuser", "-u", as_user, "--", *argv]
        for name, value in (env or {}).items():
            if secrets.is_secret_name(name):
                secrets.register(value)
        if self.dry_run and not read_only:
            self.say(f"would run: {printable(argv, env)}")
            return Result(argv=argv, dry_run=True)
        log.debug("running: %s", printable(argv, env))
        return self._run_with_sh(argv, env=env, stdin=stdin, stdout=stdout,
                                 timeout=timeout or self.default_timeout, cwd=cwd, check=check, binary=binary,
                                 passthrough=passthrough, output=output, echo=echo)

    def probe(self, invocations: Iterable[tuple[Sequence[Any], Mapping[str, str] | None]], *,
              timeout: float = 30) -> list[Result]:
        """Run short read-only programs side by side, [(argv, env), ...] -> [Result, ...]; never raises
        for an exit status (a program not found is 127, a timeout 124).

        For quick answers (dbdeck.quick): plain subprocess, because importing sh costs more than the
        queries being run. Everything else goes through run()."""
        import time

        started: list[tuple[list[str], subprocess.Popen | None]] = []
        results: list[Result] = []
        for given, env in invocations:
            argv = [str(a) for a in given]
            for name, value in (env or {}).items():
                if secrets.is_secret_name(name):
                    secrets.register(value)
            log.debug("probing: %s", printable(argv, env))
            try:
                with _StopsDeferred() as stops:
                    started.append((argv, subprocess.Popen(argv, env={**os.environ, **(env or {})},
                                                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                           stderr=subprocess.PIPE)))
                stops.deliver()
            except FileNotFoundError:
                started.append((argv, None))
        deadline = time.monotonic() + timeout
        for argv, process in started:
            if process is None:
                results.append(Result(argv=argv, returncode=127, stderr=f"program not found: {argv[0]}"))
                continue
            try:
                out, err = process.communicate(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
                results.append(Result(argv=argv, returncode=124, stderr=f"timed out after {timeout}s"))
                continue
            results.append(Result(argv=argv, returncode=process.returncode, stdout=_decode(out),
                                  stderr=_decode(err)))
        return results

    def _run_with_sh(self, argv, *, env, stdin, stdout, timeout, cwd, check, binary, passthrough=False,
                     output=None, echo=False):
        import sh

        tied = _tied_to_us(argv, env)
        program = sh.Command(tied[0])
        kwargs = dict(
            _env={**os.environ, **(env or {})},
            _timeout=timeout,
            _cwd=str(cwd) if cwd else None,
            _ok_code=list(range(0, 256)),
            _return_cmd=True,
            _tty_out=False,
        )
        if stdin is not None:
            kwargs["_in"] = stdin
        if stdout is not None:
            kwargs["_out"] = stdout
        if passthrough:
            import sys

            kwargs["_out"], kwargs["_err"] = sys.stdout.buffer, sys.stderr.buffer
        if output is not None:
            kwargs["_err_to_out"] = True
            kwargs["_out"] = _tee(output) if echo else output
        try:
            with _StopsDeferred() as stops:
                running = program(*tied[1:], _bg=True, _bg_exc=False, **kwargs)
                _track(running.pid)
            try:
                stops.deliver()
                done = running.wait()
            except (sh.TimeoutException, sh.SignalException, sh.ErrorReturnCode):
                raise
            except BaseException:  # Ctrl-C, SIGTERM (cli), a failure elsewhere: the program stops with us
                _stop(running.pid)
                try:
                    running.wait(timeout=5)  # lets sh see the end and cancel its timeout timer thread,
                except BaseException:  # noqa: BLE001 - which would otherwise keep the interpreter alive
                    pass
                raise
            finally:
                _untrack(running.pid)
        except sh.TimeoutException:
            raise CommandTimeout(f"timed out after {timeout}s: {printable(argv)}", argv=argv) from None
        except sh.SignalException as exc:
            stderr = _decode(exc.stderr)
            raise CommandFailed(
                f"killed by signal {-exc.exit_code}: {printable(argv)}{_tail(stderr)}",
                argv=argv, returncode=exc.exit_code, stderr=secrets.mask(stderr)) from None
        out = b"" if (stdout is not None or passthrough or output is not None) else (done.stdout or b"")
        result = Result(argv=argv, returncode=done.exit_code,
                        # binary=True: the caller asked for bytes
                        stdout=out if binary else _decode(out), stderr=_decode(done.stderr))  # type: ignore[arg-type]
        if check and result.returncode != 0:
            raise CommandFailed(
                f"exit status {result.returncode}: {printable(argv)}{_tail(result.stderr)}",
                argv=argv, returncode=result.returncode, stderr=secrets.mask(result.stderr))
        return result

    def pipeline(self, stages: Sequence[tuple[Sequence[Any], Mapping[str, str] | None]], *,
                 timeout: float | None = None, stdout: IO[bytes] | None = None, read_only: bool = False) -> Result:
        """Run `a | b | ...` with kernel pipes between the stages (no copying through Python).

        stages   a list of (argv, env) pairs; each env holds that stage's own secrets
        stdout   an open binary file for the last stage's output (default: captured)
        Fails like `set -o pipefail`: any stage's non-zero exit raises CommandFailed naming that stage.
        """
        prepared: list[tuple[list[str], dict[str, str]]] = [([str(a) for a in argv], dict(env or {}))
                                                            for argv, env in stages]
        for _, stage_env in prepared:
            for name, value in stage_env.items():
                if secrets.is_secret_name(name):
                    secrets.register(value)
        shown = " | ".join(printable(argv, env) for argv, env in prepared)
        if self.dry_run and not read_only:
            self.say(f"would run: {shown}")
            return Result(argv=[a for argv, _ in prepared for a in (*argv, "|")][:-1], dry_run=True)
        log.debug("running: %s", shown)
        import tempfile
        import time

        processes, error_files = [], []
        previous = None
        try:
            for index, (argv, env) in enumerate(prepared):
                last = index == len(prepared) - 1
                error_file = tempfile.TemporaryFile()
                error_files.append(error_file)
                tied = _tied_to_us(argv, env)
                with _StopsDeferred() as stops:
                    process = subprocess.Popen(
                        tied, stdin=previous if previous is not None else subprocess.DEVNULL,
                        stdout=(stdout if stdout is not None else subprocess.PIPE) if last else subprocess.PIPE,
                        stderr=error_file, env={**os.environ, **env})
                    _track(process.pid)
                    processes.append(process)
                stops.deliver()
                if previous is not None:
                    previous.close()  # the next stage holds the read end now; EOF/SIGPIPE propagate
                previous = process.stdout if not last else None
            deadline = time.monotonic() + timeout if timeout else None
            captured = b""
            if stdout is None:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    captured, _ = processes[-1].communicate(timeout=remaining)
                except subprocess.TimeoutExpired:
                    raise CommandTimeout(f"timed out after {timeout}s: {shown}", argv=prepared[-1][0]) from None
            for process in processes:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    process.wait(timeout=remaining)
                except subprocess.TimeoutExpired:
                    raise CommandTimeout(f"timed out after {timeout}s: {shown}", argv=prepared[-1][0]) from None
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
                _untrack(process.pid)
        stderr_texts = []
        for error_file in error_files:
            error_file.seek(0)
            stderr_texts.append(_decode(error_file.read()))
            error_file.close()
        for (argv, env), process, stderr in zip(prepared, processes, stderr_texts):
            if process.returncode != 0:
                raise CommandFailed(f"exit status {process.returncode} in pipeline stage: {printable(argv, env)}"
                                    f"{_tail(stderr)}", argv=argv, returncode=process.returncode,
                                    stderr=secrets.mask(stderr))
        return Result(argv=prepared[-1][0], stdout=_decode(captured), stderr="".join(stderr_texts))

    def open_session(self, argv: Sequence[Any], *, env: Mapping[str, str] | None = None) -> "Session":
        """Start an interactive program (e.g. psql holding a transaction open) that we feed lines and
        read lines from. It runs in a dry run too: callers use it only for read-only sessions."""
        argv = [str(a) for a in argv]
        for name, value in (env or {}).items():
            if secrets.is_secret_name(name):
                secrets.register(value)
        log.debug("opening session: %s", printable(argv, env))
        import tempfile

        errors = tempfile.TemporaryFile()
        try:
            tied = _tied_to_us(argv, env)
        except CommandFailed:
            errors.close()
            raise
        with _StopsDeferred() as stops:
            popen = subprocess.Popen(tied, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors,
                                     env={**os.environ, **(env or {})})
        session = Session(argv, env, popen, errors)
        stops.deliver()
        return session

    def start_daemon(self, argv: Sequence[Any], *, log_path: str | Path | None = None,
                     env: Mapping[str, str] | None = None, as_user: str | None = None,
                     cwd: str | Path | None = None) -> Daemon:
        """Start a program without waiting for it, in its own session (a terminal's Ctrl-C does not
        reach it); output goes to log_path, or to our own stdout/stderr when log_path is None."""
        argv = [str(a) for a in argv]
        if as_user and os.geteuid() == 0:
            argv = ["runuser", "-u", as_user, "--", *argv]
        if self.dry_run:
            self.say(f"would start: {printable(argv, env)}")
            return Daemon(argv=argv, pid=0, log_path=Path(log_path) if log_path else None)
        log.debug("starting: %s", printable(argv, env))
        if log_path:  # dbdeck daemons time-stamp each line of that file (see cli.run_command)
            env = {**(env or {}), "DBDECK_TIMESTAMP_LINES": "1"}
        try:
            out = open(log_path, "ab") if log_path else None
            try:
                with _StopsDeferred() as stops:
                    popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=subprocess.STDOUT if out else None,
                                             env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)
                stops.deliver()  # a daemon is meant to outlive us: it is not stopped with us
            finally:
                if out:
                    out.close()
        except FileNotFoundError:
            raise CommandFailed(f"program not found: {argv[0]} (is it installed and on PATH?)",
                                argv=argv, returncode=127) from None
        return Daemon(argv=argv, pid=popen.pid, log_path=Path(log_path) if log_path else None, _popen=popen)


def _stop(pid, grace=5.0):
    """SIGTERM, then SIGKILL after grace seconds; reaps nothing (sh's own thread does)."""
    import time

    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tee(output):
    import sys

    def write(chunk):
        data = chunk.encode() if isinstance(chunk, str) else chunk
        output.write(data)
        output.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    return write


def _decode(data):
    if data is None:
        return ""
    if isinstance(data, str):
        return data
    return data.decode("utf-8", errors="replace")


def _tail(stderr):
    stderr = (stderr or "").strip()
    if not stderr:
        return ""
    if len(stderr) > _STDERR_TAIL_CHARS:
        stderr = "..." + stderr[-_STDERR_TAIL_CHARS:]
    return "\n" + secrets.mask(stderr)
