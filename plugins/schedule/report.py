"""Each job's state for `schedule status` and `dbdeck status`: last run, next run, failing or stale."""

import time
from datetime import datetime

from dbdeck.errors import DbdeckError
from dbdeck.status import Item, epoch, iso

STALE_AFTER_RUNS = 3  # a job that has not succeeded in this many of its intervals is stale


def runs_after(job, name, start_ts, count):
    """The Unix times of the job's next `count` runs after start_ts (None when only systemd knows)."""
    from .timing import cron_expression

    if job.every is not None and job.every_seconds < 60:
        return [start_ts + job.every_seconds * (i + 1) for i in range(count)]
    try:
        expression = cron_expression(name, job)
    except DbdeckError:
        return None
    from croniter import croniter

    runs = croniter(expression, datetime.fromtimestamp(start_ts).astimezone())
    return [runs.get_next(float) for _ in range(count)]


def job_item(app, name, job, installed, last, holder):
    running_pid = (holder or {}).get("pid") if holder is not None else None
    last_success_ts = epoch(last.get("last_success"))
    now = time.time()
    upcoming = runs_after(job, name, now, 1) if job.enabled and installed else None
    exit_code = last.get("last_exit_code")
    if holder is not None:
        state, detail = "running", f"pid {running_pid} since {last.get('last_start') or '?'}"
    elif not job.enabled:
        state, detail = "disabled", "not configured" if job.command else "disabled"
    elif last.get("last_end") is None and not last.get("last_start"):
        state, detail = "never", "installed, not run yet" if installed else "not installed"
    elif exit_code not in (0, 75, None):
        state, detail = "failing", f"exit {exit_code}" + (f"; log {last['log']}" if last.get("log") else "")
    else:
        state, detail = "ok", f"exit {exit_code} in {last.get('last_duration_s')}s"
    if state in ("ok", "failing") and installed:
        reference = last_success_ts or epoch(last.get("first_start")) or epoch(last.get("last_start"))
        deadline = runs_after(job, name, reference, STALE_AFTER_RUNS) if reference else None
        if deadline and now > deadline[-1] + 60:  # a minute's grace for cron's start and RandomizedDelaySec
            state = "stale" if state == "ok" else state
            detail += f"; no success since {last.get('last_success') or 'ever'} ({STALE_AFTER_RUNS} runs missed)"
    if not installed and job.enabled and state not in ("running", "never"):
        detail += "; not installed (dbdeck schedule install)"
    metrics = {"dbdeck_job_running": 1 if holder is not None else 0}
    pace = runs_after(job, name, now, 2)
    if pace:
        metrics["dbdeck_job_interval_seconds"] = round(pace[1] - pace[0], 3)
    if last_success_ts is not None:
        metrics["dbdeck_job_last_success_timestamp_seconds"] = last_success_ts
    if last.get("last_duration_s") is not None:
        metrics["dbdeck_job_last_duration_seconds"] = last["last_duration_s"]
    if exit_code is not None:
        metrics["dbdeck_job_last_exit_code"] = exit_code
    return Item(kind="job", name=name, state=state, detail=detail, last=last.get("last_start"),
                next=iso(upcoming[0]) if upcoming else None, labels={"dbdeck_job": name}, metrics=metrics,
                data={"timing": job.timing(), "command": job.command, "enabled": job.enabled,
                      "installed": installed, "running_pid": running_pid, "last_start": last.get("last_start"),
                      "last_end": last.get("last_end"), "last_exit_code": exit_code,
                      "last_duration_s": last.get("last_duration_s"), "last_success": last.get("last_success"),
                      "last_skipped": last.get("last_skipped"), "log": last.get("log")})


def worth_showing(app, jobs):
    """Enabled jobs, and disabled ones that have run here (a default job of an unused plugin is noise)."""
    from .jobs import run_state

    recorded = run_state(app).read()
    return {n: j for n, j in jobs.items() if j.enabled or n in recorded}


def job_items(app, jobs, backend):
    from .jobs import run_state

    try:
        installed = backend.installed(jobs)
    except DbdeckError as exc:  # e.g. crontab unreadable: say so in the rows, do not fail the whole view
        installed = {name: None for name in jobs}
        problem = str(exc)
    else:
        problem = None
    state = run_state(app)
    items = []
    for name, job in jobs.items():
        item = job_item(app, name, job, installed.get(name), state.entry(name),
                        app.lock(f"schedule-{name}").holder())
        if problem:
            item.detail += f"; {problem}"
        items.append(item)
    return items
