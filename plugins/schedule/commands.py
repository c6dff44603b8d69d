"""Click commands of the schedule plugin."""

import logging
import os
import sys
import time

import click

from dbdeck.cli import pass_app

log = logging.getLogger("dbdeck.schedule")
SYNC_JOB = "sync-prod-to-dev"
_SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"



def backend_options(command):
    """--backend and --systemd-root, shared by install, remove and status."""
    command = click.option("--systemd-root", type=click.Path(file_okay=False), default=None,
                           help="Install units under DIR/etc/systemd/system and enable them with "
                                "`systemctl --root=DIR` (for images and hosts where systemd is not running).")(command)
    return click.option("--backend", type=click.Choice(["cron", "systemd"]),
                        help="Where to install (default: scheduler.backend in the config, else cron).")(command)


def _backend(app, name, systemd_root=None):
    settings = app.config.section("scheduler")
    chosen = name or settings.backend
    if chosen == "systemd":
        from .systemd import SystemdBackend

        return SystemdBackend(app, settings, app.runner, root=systemd_root)
    from .cron import CronBackend

    return CronBackend(app, settings, app.runner)


@click.group("schedule")
def schedule_group():
    """Run the jobs of the `schedules:` config section from cron, systemd timers or a foreground loop.

    Every run goes through `dbdeck schedule exec JOB`, which holds the job's lock (a run that finds the
    previous one still going exits 75 at once) and records start, end and exit code for `status`.
    """


@schedule_group.command("install")
@click.argument("names", nargs=-1)
@backend_options
@pass_app
def install(app, names, backend, systemd_root):
    """Install the jobs (all, or NAMES) into cron or systemd. Idempotent; --dry-run shows the result.

    Installing all jobs also removes dbdeck's entries for jobs no longer in the config; lines and units
    that dbdeck did not write are never touched.
    """
    from .jobs import all_jobs, select

    jobs = select(all_jobs(app), names)
    changed = _backend(app, backend, systemd_root).install(jobs, prune=not names)
    _report(app, "install", changed)


@schedule_group.command("remove")
@click.argument("names", nargs=-1)
@backend_options
@pass_app
def remove(app, names, backend, systemd_root):
    """Remove dbdeck's entries for NAMES (default: every dbdeck job) from cron or systemd."""
    changed = _backend(app, backend, systemd_root).remove(list(names) or None)
    _report(app, "remove", changed)


def _report(app, action, changed):
    verb = "would change" if app.dry_run else "changed"
    app.emit({"action": action, "changed": changed, "dry_run": app.dry_run},
             (f"{verb}: " + ", ".join(changed)) if changed else "nothing to change")


@schedule_group.command("status")
@click.argument("names", nargs=-1)
@backend_options
@pass_app
def status(app, names, backend, systemd_root):
    """Each job: its timing, where it is installed, its last run (time, exit code, duration), running now."""
    from .jobs import all_jobs, run_state, select

    jobs = select(all_jobs(app), names)
    installed = _backend(app, backend, systemd_root).installed(jobs)
    state = run_state(app).read()
    rows = []
    for name, job in jobs.items():
        last = state.get(name, {})
        holder = app.lock(f"schedule-{name}").holder()
        rows.append({"job": name, "timing": job.timing(), "command": job.command, "enabled": job.enabled,
                     "installed": installed.get(name), "running_pid": (holder or {}).get("pid"),
                     "last_start": last.get("last_start"), "last_end": last.get("last_end"),
                     "last_exit_code": last.get("last_exit_code"), "last_duration_s": last.get("last_duration_s"),
                     "last_skipped": last.get("last_skipped")})

    def text():
        if not rows:
            return "no scheduled jobs configured (add them under `schedules:`)"
        lines = []
        for r in rows:
            where = r["installed"] or "not installed"
            last = (f"last run {r['last_start']} exit {r['last_exit_code']} in {r['last_duration_s']}s"
                    if r["last_start"] else "never run")
            running = f", running now (pid {r['running_pid']})" if r["running_pid"] else ""
            lines.append(f"{r['job']:<22} {r['timing']:<22} {last}{running}\n{'':<22} {where}")
        return "\n".join(lines)

    app.emit(rows, text)


@schedule_group.command("run")
@click.argument("names", nargs=-1)
@click.option("--now", "run_now", is_flag=True, help="Run every job once at start, then on schedule.")
@click.option("--max-seconds", type=float, default=None, hidden=True,
              help="Stop by itself after this long (tests, demos).")
@pass_app
def run(app, names, run_now, max_seconds):
    """Run the scheduler in the foreground (for hosts without cron or systemd). Stops on SIGTERM/Ctrl-C
    after the running jobs finish."""
    from dbdeck import log as log_module

    from .foreground import ForegroundScheduler
    from .jobs import all_jobs, select

    if app.verbosity == 0:
        log_module.setup(1)  # a long-running scheduler should say what it does
    jobs = select(all_jobs(app), names)
    if app.dry_run:
        for name, job in jobs.items():
            if job.enabled:
                app.runner.say(f"would run {name} ({job.timing()}): {' '.join(job.command)}")
        return
    finished = ForegroundScheduler(app, jobs).run(run_now=run_now, max_seconds=max_seconds)
    if app.format == "json":
        app.emit([{"job": n, "exit_code": s, "duration_s": round(d, 3)} for n, s, d in finished])


@schedule_group.command("exec")
@click.argument("name")
@pass_app
def exec_job(app, name):
    """Run one job now, as cron, systemd and `schedule run` do: under its lock, recording the outcome."""
    from dbdeck import log as log_module
    from dbdeck.errors import CommandFailed, CommandTimeout, LockBusy

    from .jobs import all_jobs, job_argv, now_iso, run_state, select

    job = select(all_jobs(app), [name])[name]
    state = run_state(app)
    if app.config.core.log_dir and not app.dry_run:
        log_module.add_daily_file(app.config.core.log_dir, "schedule")
    lock = app.lock(f"schedule-{name}")
    try:
        lock.acquire()
    except LockBusy as busy:
        state.update(name, last_skipped=now_iso())
        log.warning("job %s: %s", name, busy)
        raise
    env = _job_environment(job)
    started, clock = now_iso(), time.monotonic()
    if not app.dry_run:
        state.update(name, last_start=started, last_end=None, last_exit_code=None, running_pid=os.getpid())
    status = 1
    try:
        result = app.runner.run(job_argv(app, job), env=env, passthrough=True, check=False, timeout=job.timeout)
        status = result.returncode
    except CommandTimeout as exc:
        status = 124
        log.error("job %s: %s", name, exc)
    except CommandFailed as exc:
        status = exc.returncode if isinstance(exc.returncode, int) and exc.returncode > 0 else 1
        log.error("job %s: %s", name, exc)
    finally:
        duration = round(time.monotonic() - clock, 3)
        if not app.dry_run:
            state.update(name, last_end=now_iso(), last_exit_code=status, last_duration_s=duration, running_pid=None)
        lock.release()
    level = logging.INFO if status == 0 else logging.ERROR
    log.log(level, "job %s: exit %s in %.2fs", name, status, duration)
    sys.exit(status)


def _job_environment(job):
    env = {}
    path = os.environ.get("PATH", "")
    missing = [p for p in _SAFE_PATH.split(":") if p not in path.split(":")]
    if missing:  # cron starts jobs with PATH=/usr/bin:/bin; docker may live in /usr/local/bin
        env["PATH"] = ":".join([p for p in path.split(":") if p] + missing)
    if job.env_file:
        from dotenv import dotenv_values

        from dbdeck.errors import ConfigError

        if not job.env_file.is_file():
            raise ConfigError(f"env_file {job.env_file} not found")
        env.update({k: v for k, v in dotenv_values(job.env_file).items() if v is not None})
    return env


@click.command("setup-sync-cron")
@click.option("--install", "action", flag_value="install", help="Install the cron job (every SYNC_CRON_INTERVAL "
                                                                 "minutes, default 5).")
@click.option("--status", "action", flag_value="status", help="Show the cron line and the last run.")
@click.option("--remove", "action", flag_value="remove", help="Remove the cron job.")
@pass_app
def setup_sync_cron(app, action):
    """Schedule sync-prod-to-dev in cron, as setup-sync-cron.sh did (SYNC_CRON_INTERVAL minutes, default 5)."""
    from .cron import CronBackend
    from .jobs import run_state
    from .model import Job

    if action is None:
        raise click.UsageError("give one of --install, --status or --remove")
    settings = app.config.section("scheduler")
    minutes = settings.sync_cron_interval
    timing = {"cron": f"*/{minutes} * * * *"} if minutes < 60 else {"every": f"{minutes}m"}
    job = app.config.section("schedules").root.get(SYNC_JOB) or Job(command=[SYNC_JOB], **timing)
    backend = CronBackend(app, settings, app.runner)
    jobs = {SYNC_JOB: job}
    if action == "install":
        changed = backend.install(jobs, prune=False)
        line = backend.line_for(SYNC_JOB, job, with_user=bool(settings.cron_file))
        app.emit({"installed": True, "changed": bool(changed), "line": line},
                 f"{'would install' if app.dry_run else 'installed' if changed else 'already installed'}: {line}")
    elif action == "remove":
        changed = backend.remove([SYNC_JOB])
        app.emit({"removed": bool(changed)}, "removed" if changed else "not installed; nothing to remove")
    else:
        line = backend.installed(jobs)[SYNC_JOB]
        last = run_state(app).read().get(SYNC_JOB, {})
        app.emit({"installed": bool(line), "line": line, **last},
                 (f"installed: {line}" if line else "not installed (run setup-sync-cron --install)")
                 + (f"\nlast run {last.get('last_start')}: exit {last.get('last_exit_code')} in "
                    f"{last.get('last_duration_s')}s" if last.get("last_start") else "\nnever run"))
        if not line:
            sys.exit(1)
