"""Click commands of the schedule plugin."""

import logging
import sys

import click

from dbdeck.cli import pass_app

log = logging.getLogger("dbdeck.schedule")
_USED_AT_INSTALL = {"SYNC_CRON_INTERVAL"}  # read by the install itself (it sets the timing), not by the runs


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
    _warn_shell_only_settings(app)
    changed = _backend(app, backend, systemd_root).install(jobs, prune=not names)
    _report(app, "install", changed)
    for name, job in jobs.items():
        if not job.enabled:
            log.log(logging.WARNING if names else logging.INFO,
                    "job %s not installed: it is disabled (%s); enable it under `schedules: %s: {enabled: true}`",
                    name, "its plugin is not configured" if job.command else "disabled", name)


def _warn_shell_only_settings(app):
    """Variables set in this shell change the config now, but cron and systemd will not have them."""
    lost = [v for v in app.config.shell_overrides if v not in _USED_AT_INSTALL]
    if lost:
        log.warning("%s set in this shell but scheduled runs will not see it: put it in a file listed under "
                    "dbdeck.env_files (or in the config) before installing", ", ".join(lost))


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
    """Each job: its timing, where it is installed, its last run (time, exit code, duration), its next run,
    running now. Exit 1 when a job is failing or stale (no success in 3 of its intervals)."""
    from .jobs import all_jobs, select
    from .report import job_items, worth_showing

    jobs = select(all_jobs(app), names) if names else worth_showing(app, all_jobs(app))
    items = job_items(app, jobs, _backend(app, backend, systemd_root))
    rows = [{"job": i.name, "state": i.state, **i.data, "next_run": i.next} for i in items]

    def text():
        if not rows:
            return "no scheduled jobs (add them under `schedules:`)"
        lines = []
        for item, row in zip(items, rows):
            last = (f"last run {row['last_start']} exit {row['last_exit_code']} in {row['last_duration_s']}s"
                    if row["last_start"] else "never run")
            running = f", running now (pid {row['running_pid']})" if row["running_pid"] else ""
            upcoming = f", next {item.next}" if item.next else ""
            lines.append(f"{item.name:<22} {row['timing']:<22} {item.state}: {last}{running}{upcoming}\n"
                         f"{'':<22} {row['installed'] or 'not installed'}")
        return "\n".join(lines)

    app.emit(rows, text)
    if any(i.problem for i in items) or app.hook_failures:
        sys.exit(1)


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
    def ready():  # a service: its one document says what it runs; each run is a log line
        if app.format == "json":
            app.announce("schedule run", jobs={name: job.timing() for name, job in jobs.items() if job.enabled})

    ForegroundScheduler(app, jobs).run(run_now=run_now, max_seconds=max_seconds, ready=ready)


@schedule_group.command("exec")
@click.argument("name")
@pass_app
def exec_job(app, name):
    """Run one job now, as cron, systemd and `schedule run` do: under its lock, output appended to the job's
    log (<log_dir>/job-NAME.log), outcome recorded for `status`.

    Prints nothing when the job succeeds, so cron mails only failures (with the end of the output); on a
    terminal or under systemd the output is shown as well. Exit: the job's own, 75 when its previous run
    still holds the lock, 124 when it ran past its `timeout:`.
    """
    from .execute import execute

    sys.exit(execute(app, name))


@click.command("setup-sync-cron")
@click.option("--install", "action", flag_value="install", help="Install the cron job (every SYNC_CRON_INTERVAL "
                                                                 "minutes, default 5).")
@click.option("--status", "action", flag_value="status", help="Show the cron line and the last run.")
@click.option("--remove", "action", flag_value="remove", help="Remove the cron job.")
@pass_app
def setup_sync_cron(app, action):
    """Schedule sync-prod-to-dev in cron, as setup-sync-cron.sh did (SYNC_CRON_INTERVAL minutes, default 5)."""
    from .cron import CronBackend
    from .jobs import SYNC_JOB, all_jobs, run_state

    if action is None:
        raise click.UsageError("give one of --install, --status or --remove")
    settings = app.config.section("scheduler")
    job = all_jobs(app)[SYNC_JOB].model_copy(update={"enabled": True})  # asked for by name: install it
    backend = CronBackend(app, settings, app.runner)
    jobs = {SYNC_JOB: job}
    if action == "install":
        _warn_shell_only_settings(app)
        changed = backend.install(jobs, prune=False)
        line = backend.line_for(SYNC_JOB, job, with_user=bool(settings.cron_file))
        app.emit({"installed": True, "changed": bool(changed), "line": line},
                 f"{'would install' if app.dry_run else 'installed' if changed else 'already installed'}: {line}")
    elif action == "remove":
        changed = backend.remove([SYNC_JOB])
        app.emit({"removed": bool(changed)}, "removed" if changed else "not installed; nothing to remove")
    else:
        line = backend.installed(jobs)[SYNC_JOB]
        last = run_state(app).entry(SYNC_JOB)
        app.emit({"installed": bool(line), "line": line, **last},
                 (f"installed: {line}" if line else "not installed (run setup-sync-cron --install)")
                 + (f"\nlast run {last.get('last_start')}: exit {last.get('last_exit_code')} in "
                    f"{last.get('last_duration_s')}s" if last.get("last_start") else "\nnever run"))
        if not line:
            sys.exit(1)
