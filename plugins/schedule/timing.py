"""Turning a job's timing into what each backend understands (cron line, systemd OnCalendar)."""

from dbdeck.errors import ConfigError

_DAY_NAMES = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"]


def cron_expression(name, job):
    """A five-field cron expression for the job, or ConfigError when cron cannot express it."""
    if job.cron is not None:
        return job.cron
    if job.on_calendar is not None:
        raise ConfigError(f"job {name}: on_calendar is systemd-only; give it `cron:` or `every:` for the cron "
                          f"backend")
    seconds = job.every_seconds
    if seconds != int(seconds) or seconds % 60:
        raise ConfigError(f"job {name}: every {job.every} is finer than cron's one-minute resolution; "
                          f"use the systemd backend or `dbdeck schedule run`")
    minutes = int(seconds) // 60
    if minutes < 60 and 60 % minutes == 0:
        return "* * * * *" if minutes == 1 else f"*/{minutes} * * * *"
    if minutes % 60 == 0 and minutes < 1440 and 24 % (minutes // 60) == 0:
        hours = minutes // 60
        return "0 * * * *" if hours == 1 else f"0 */{hours} * * *"
    if minutes == 1440:
        return "0 0 * * *"
    raise ConfigError(f"job {name}: every {job.every} does not divide an hour or a day evenly, so cron cannot "
                      f"run it at a steady interval; give a `cron:` expression")


def on_calendar(name, job):
    """A systemd OnCalendar expression for the job."""
    if job.on_calendar is not None:
        return job.on_calendar
    if job.every is not None:
        seconds = job.every_seconds
        if seconds != int(seconds):
            raise ConfigError(f"job {name}: every {job.every}: systemd timers take whole seconds")
        seconds = int(seconds)
        if seconds < 60 and 60 % seconds == 0:
            return f"*:*:0/{seconds}"
        if seconds % 60 == 0 and seconds < 3600 and 3600 % seconds == 0:
            return f"*:0/{seconds // 60}"
        if seconds % 3600 == 0 and seconds < 86400 and 86400 % seconds == 0:
            return f"0/{seconds // 3600}:00"
    cron = cron_expression(name, job)
    from croniter import croniter

    (minutes, hours, days, months, weekdays), _ = croniter.expand(cron)
    if days != ["*"] and weekdays != ["*"]:
        raise ConfigError(f"job {name}: cron {cron!r} restricts both day of month and day of week, which cron "
                          f"ORs and systemd ANDs; give the job an explicit on_calendar")

    def listed(values, width=2):
        return "*" if values == ["*"] else ",".join(f"{v:0{width}d}" for v in values)

    day_part = "" if weekdays == ["*"] else ",".join(_DAY_NAMES[v % 7] for v in weekdays) + " "
    return f"{day_part}*-{listed(months)}-{listed(days)} {listed(hours)}:{listed(minutes)}:00"
