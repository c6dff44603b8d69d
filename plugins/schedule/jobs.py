"""Jobs as configured (plus plugins' defaults), how a job is invoked, and its run state."""

import logging
from pathlib import Path

from dbdeck.errors import ConfigError, UsageError
from dbdeck.run import dbdeck_argv as launcher_argv
from dbdeck.state import StateFile

from .model import TIMING_KEYS, Job

log = logging.getLogger("dbdeck.schedule")
STATE_FILE = "schedule-state.json"
SYNC_JOB = "sync-prod-to-dev"


def default_jobs(app):
    """name -> Job offered by plugins (scheduled_jobs hook), before the `schedules:` section."""
    from dbdeck.config import validate_model

    jobs = {}
    before = len(app.hook_failures)
    offers = app.guarded_hook("scheduled_jobs", config=app.config)
    for failure in app.hook_failures[before:]:  # that plugin's jobs are missing; the others' still run
        log.error("%s: its default jobs are left out", failure.message)
    for _, offered in offers:
        for spec in offered or ():
            spec = dict(spec)
            name = spec.pop("name")
            jobs[name] = validate_model(Job, spec, ("default job", name))
    if SYNC_JOB in jobs:  # the seed's SYNC_CRON_INTERVAL sets the interval of setup-sync-cron's job
        minutes = app.config.section("scheduler").sync_cron_interval
        timing = Job(cron=f"*/{minutes} * * * *") if minutes < 60 else Job(every=f"{minutes}m")
        jobs[SYNC_JOB] = merge(jobs[SYNC_JOB], timing)
    return jobs


def merge(base, patch):
    """base with the keys the patch sets; a patch giving a timing replaces base's timing."""
    fields = base.model_dump()
    given = {k: getattr(patch, k) for k in patch.model_fields_set}
    if any(given.get(k) is not None for k in TIMING_KEYS):
        for key in TIMING_KEYS:
            fields[key] = None
    fields.update(given)
    return Job.model_validate(fields)


def all_jobs(app):
    """name -> Job: plugins' default jobs, changed or added to by the `schedules:` section."""
    defaults = default_jobs(app)
    jobs = dict(defaults)
    for name, entry in app.config.section("schedules").root.items():
        if entry.command is not None:
            jobs[name] = entry
        elif name in defaults:
            jobs[name] = merge(defaults[name], entry)
        else:
            offered = ", ".join(sorted(defaults)) or "none"
            raise ConfigError(f"{app.config.where()}: schedules.{name}: no plugin offers a job named {name!r} "
                              f"(default jobs: {offered}); give it a command and one of every, cron or on_calendar")
    base = Path(app.config.path).resolve().parent if app.config.path else Path.cwd()
    for name, job in jobs.items():
        if job.env_file is not None and not job.env_file.is_absolute():
            jobs[name] = job.model_copy(update={"env_file": base / job.env_file})
    return jobs


def select(jobs, names):
    unknown = [n for n in names if n not in jobs]
    if unknown:
        known = ", ".join(sorted(jobs)) or "none configured"
        raise UsageError(f"no scheduled job named {unknown[0]!r} (known: {known})")
    return {n: jobs[n] for n in names} if names else jobs


def config_args(app):
    """The config in force now, pinned: cron and systemd start jobs from / with a bare environment."""
    path = app.config.path
    return ["--config", str(Path(path).resolve())] if path is not None else ["--no-config"]


def dbdeck_argv(app, *args):
    """How cron, systemd or the foreground scheduler start dbdeck: this interpreter, absolute paths."""
    return launcher_argv("dbdeck", *config_args(app), *args)


def is_dbdeck_command(job):
    first = job.command[0]
    if first == "dbdeck":
        return True
    from dbdeck.cli import build_cli

    return build_cli().get_command(None, first) is not None


def dbdeck_args(app, job):
    """A dbdeck job's arguments to `dbdeck` itself, with the config pinned."""
    command = job.command[1:] if job.command[0] == "dbdeck" else job.command
    return [*config_args(app), *command]


def job_argv(app, job):
    """The program a job runs: a dbdeck command (with the config pinned), or any other program."""
    if not is_dbdeck_command(job):
        return list(job.command)
    return launcher_argv("dbdeck", *dbdeck_args(app, job))


def state_dir(app):
    configured = app.config.section("scheduler").state_dir
    return Path(configured) if configured else app.config.state_dir


def log_dir(app):
    """Where each job's output goes: dbdeck.log_dir, else <state dir>/log."""
    return Path(app.config.core.log_dir) if app.config.core.log_dir else state_dir(app) / "log"


def run_state(app):
    """Last start, end, exit code and duration of each job (updated by `schedule exec`)."""
    return StateFile(state_dir(app) / STATE_FILE)


def printable_argv(argv):
    from dbdeck.run import printable

    return printable(argv)
