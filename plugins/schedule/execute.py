"""`dbdeck schedule exec JOB`: one run of a job, as cron, systemd and `schedule run` start it.

The run holds the job's lock (a run that finds the previous one still going is skipped, exit 75), appends
the job's output to <log dir>/job-<name>.log and records the outcome for `schedule status` and
`dbdeck status`. It prints nothing when the job succeeds, so cron mails only failures, with the end of
this run's output; on a terminal or under systemd (journald) the output is shown as it comes.
"""

import logging
import os
import sys
import time

from dbdeck import secrets
from dbdeck.errors import EXIT_LOCKED, CommandFailed, CommandTimeout, LockBusy

from . import bookkeeping
from .bookkeeping import now_iso
from .jobs import all_jobs, dbdeck_args, is_dbdeck_command, job_argv, log_dir, printable_argv, run_state, select

log = logging.getLogger("dbdeck.schedule")
_SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_TAIL_LINES = 20


def execute(app, name):
    """Run job `name` once; returns its exit status."""
    job = select(all_jobs(app), [name])[name]
    argv = job_argv(app, job)
    if app.dry_run:
        app.runner.say(f"would run job {name}: {printable_argv(argv)}")
        return 0
    state = run_state(app)
    log_path = log_dir(app) / f"job-{name}.log"
    show = bookkeeping.someone_watches()
    lock = app.lock(f"schedule-{name}")
    try:
        lock.acquire()
    except LockBusy as busy:
        state.update(name, last_skipped=now_iso())
        _append(log_path, f"=== {now_iso()} skipped: {busy}\n")
        if show:
            print(f"job {name}: skipped: {busy}", file=sys.stderr)
        return EXIT_LOCKED
    try:
        return _run_locked(app, name, job, argv, state, log_path, show)
    finally:
        lock.release()


def _run_locked(app, name, job, argv, state, log_path, show):
    env = job_environment(app, job)
    started, clock = now_iso(), time.monotonic()
    bookkeeping.record_start(state, name, log_path, started)
    status, problem = 1, None
    with bookkeeping.open_log(log_path) as output:
        output.write(bookkeeping.header(started, name, printable_argv(argv)))
        output.flush()
        offset = output.tell()
        try:
            if is_dbdeck_command(job):
                _allow_quick_answers(app, name, job, argv, state, log_path)
                status = run_forked(dbdeck_args(app, job), env, output, show, job.timeout)
            else:
                result = app.runner.run(argv, env=env, output=output, echo=show, check=False, timeout=job.timeout)
                status = result.returncode
        except CommandTimeout:
            status, problem = 124, f"timed out after {job.timeout}s"
        except CommandFailed as exc:
            status = exc.returncode if isinstance(exc.returncode, int) and exc.returncode > 0 else 1
            problem = secrets.mask(str(exc).splitlines()[0])
        finally:
            duration = round(time.monotonic() - clock, 3)
            ended = now_iso()
            output.write(bookkeeping.footer(ended, status, duration, problem))
            bookkeeping.record_end(state, name, status, ended, duration)
            if status != 0:
                _forget_quick_answer()
    if status == 0:
        log.info("job %s: exit 0 in %.2fs", name, duration)
        return 0
    if status == EXIT_LOCKED:  # the job's own command found its own lock taken: a skip, not a failure
        log.info("job %s: skipped by the command itself (exit 75)", name)
        return status
    summary = (f"dbdeck: job {name} failed with exit {status} after {duration:.2f}s"
               + (f" ({problem})" if problem else ""))
    if show:
        print(f"{summary}; full output in {log_path}", file=sys.stderr)
    else:  # cron mails this: the reason, without making anyone open the log first
        print(f"{summary}; the end of {log_path}:\n{_tail(log_path, offset)}", file=sys.stderr)
    return status


def _allow_quick_answers(app, name, job, argv, state, log_path):
    """This command line (`schedule exec NAME`) may be answered quickly next time if the job's command
    leaves a stamp (dbdeck.quick); the stamp wraps its answer in this job's bookkeeping."""
    from dbdeck import quick

    files = dict(app.config.sources)
    if job.env_file:
        files[str(job.env_file.absolute())] = quick.file_digest(job.env_file)
    wrapper = ("dbdeck.plugins.schedule.bookkeeping:quick_replay",
               bookkeeping.stamp_data(name, app.lock(f"schedule-{name}").run_dir, state.path, log_path,
                                      printable_argv(argv)))
    quick.begin(sys.argv[1:], os.environ, files, wrapper)


def _forget_quick_answer():
    from dbdeck import quick

    if quick.pending() is not None:
        quick.begin(quick.pending()["argv"], {}, {})  # removes the stamp a failing run may have left


def run_forked(args, env, output, show, timeout):
    """Run a dbdeck command in a forked copy of this process: it finds Python, click, pydantic, the plugins
    and the config already loaded, so a scheduled run that has nothing to do costs one interpreter start,
    not two. Output goes to `output` (and to our stdout when someone watches); returns the exit status."""
    from dbdeck.errors import CommandTimeout

    sys.stdout.flush()
    sys.stderr.flush()
    reader, writer = os.pipe() if show else (None, None)
    pid = os.fork()
    if pid == 0:  # the child: becomes the job
        code = 1
        try:
            target = writer if show else output.fileno()
            os.dup2(target, 1)
            os.dup2(target, 2)
            if reader is not None:
                os.close(reader)
            os.environ.update(env)
            code = _run_command_here(args)
        finally:
            os._exit(code)
    if writer is not None:
        os.close(writer)
    deadline = time.monotonic() + timeout if timeout else None
    try:
        status = _wait_copying(pid, reader, output, deadline)
    except CommandTimeout:
        _stop(pid)
        raise CommandTimeout(f"timed out after {timeout}s") from None
    finally:
        if reader is not None:
            os.close(reader)
    return status


def _run_command_here(args):
    import logging as logging_module
    import traceback

    logger = logging_module.getLogger("dbdeck")
    for handler in list(logger.handlers):  # the scheduler's own log files are not the job's
        logger.removeHandler(handler)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    try:
        from dbdeck.cli import build_cli, run_command

        return run_command(build_cli(), list(args), prog_name="dbdeck")
    except BaseException:  # noqa: BLE001 - the log must say why; the exit status says it failed
        sys.stderr.write(secrets.mask(traceback.format_exc()))
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _wait_copying(pid, reader, output, deadline):
    """Wait for the job, copying its output (when it goes through a pipe) to the log and our stdout."""
    import select

    from dbdeck.errors import CommandTimeout

    finished = None
    while True:
        ready = reader is not None and select.select([reader], [], [], 0.2)[0]
        if ready:
            chunk = os.read(reader, 65536)
            if chunk:
                for stream in (output, sys.stdout.buffer):
                    stream.write(chunk)
                    stream.flush()
                continue
            reader = None  # end of output
        if finished is None:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                finished = os.waitstatus_to_exitcode(status)
        # ended, and its output is drained (or only a process it left behind still holds the pipe)
        if finished is not None and not ready:
            return finished
        if finished is None and deadline is not None and time.monotonic() > deadline:
            raise CommandTimeout("timeout")
        if reader is None:
            time.sleep(0.005)


def _stop(pid, grace=10):
    import signal

    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return
        end = time.monotonic() + wait
        while time.monotonic() < end:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
            time.sleep(0.05)


def job_environment(app, job):
    env = {}
    path = os.environ.get("PATH", "")
    missing = [p for p in _SAFE_PATH.split(":") if p not in path.split(":")]
    if missing:  # cron starts jobs with PATH=/usr/bin:/bin; docker may live in /usr/local/bin
        env["PATH"] = ":".join([p for p in path.split(":") if p] + missing)
    if app.config.path is not None:  # for jobs that are not dbdeck commands but call dbdeck themselves
        env["DBDECK_CONFIG"] = str(app.config.path.resolve())
    if job.env_file:
        from dotenv import dotenv_values

        from dbdeck.errors import ConfigError

        if not job.env_file.is_file():
            raise ConfigError(f"env_file {job.env_file} not found")
        env.update({k: v for k, v in dotenv_values(job.env_file).items() if v is not None})
    return env


def _append(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as out:
        out.write(secrets.mask(text))


def _tail(path, offset):
    with open(path, "rb") as source:
        source.seek(offset)
        lines = source.read().decode("utf-8", errors="replace").splitlines()
    shown = lines[-_TAIL_LINES:]
    skipped = f"... ({len(lines) - len(shown)} earlier lines)\n" if len(lines) > len(shown) else ""
    return secrets.mask(skipped + "\n".join(shown))
