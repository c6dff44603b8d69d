"""Jobs as configured (plus plugins' defaults), how a job is invoked, and its run state."""

import sys
import time
from pathlib import Path

from dbdeck.errors import UsageError
from dbdeck.state import StateFile

from .model import Job

STATE_FILE = "schedule-state.json"


def all_jobs(app):
    """name -> Job: plugins' default jobs (scheduled_jobs hook) overridden by the `schedules:` section."""
    from dbdeck.config import validate_model

    jobs = {}
    for offered in app.plugin_manager.hook.scheduled_jobs(config=app.config):
        for spec in offered or ():
            spec = dict(spec)
            name = spec.pop("name")
            jobs[name] = validate_model(Job, spec, ("default job", name))
    jobs.update(app.config.section("schedules").root)
    return jobs


def select(jobs, names):
    unknown = [n for n in names if n not in jobs]
    if unknown:
        known = ", ".join(sorted(jobs)) or "none configured"
        raise UsageError(f"no scheduled job named {unknown[0]!r} (known: {known})")
    return {n: jobs[n] for n in names} if names else jobs


def dbdeck_argv(app, *args):
    """How cron, systemd or the foreground scheduler start dbdeck: this interpreter, absolute paths."""
    argv = [sys.executable, "-m", "dbdeck.launch", "dbdeck"]
    config = app.config.path
    if config is not None:
        argv += ["--config", str(Path(config).resolve())]
    return [*argv, *args]


def job_argv(app, job):
    """The program a job runs: a dbdeck command through this interpreter, or any other program."""
    first = job.command[0]
    if first == "dbdeck":
        return [sys.executable, "-m", "dbdeck.launch", *job.command]
    from dbdeck.cli import build_cli

    if build_cli().get_command(None, first) is not None:
        return [sys.executable, "-m", "dbdeck.launch", *job.command]
    return list(job.command)


def state_dir(app):
    configured = app.config.section("scheduler").state_dir
    return Path(configured) if configured else app.config.state_dir


def run_state(app):
    """Last start, end, exit code and duration of each job (updated by `schedule exec`)."""
    return StateFile(state_dir(app) / STATE_FILE)


def now_iso():
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
