"""Configuration of the schedule plugin: the `scheduler:` settings and the `schedules:` jobs."""

import re
import shlex
from pathlib import Path

from pydantic import RootModel, field_validator, model_validator

from dbdeck.config import Section

JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_EVERY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|secs|seconds?|m|min|mins|minutes?|h|hours?|d|days?)?\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
TIMING_KEYS = ("every", "cron", "on_calendar")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
USER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?$")


def refuse_control_characters(value, path=()):
    """Every value here lands in a crontab line or a systemd unit, where a newline starts a new line
    (another job, an ExecStartPre=): refuse control characters anywhere, naming the key."""
    if isinstance(value, dict):
        for key, item in value.items():
            refuse_control_characters(item, (*path, str(key)))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            refuse_control_characters(item, (*path, str(index)))
    elif isinstance(value, (str, Path)) and _CONTROL.search(str(value)):
        where = ".".join(path) or "value"
        raise ValueError(f"{where}: control characters (newline, tab, ...) are not allowed: {str(value)!r}")
    return value


def _user_name(value):
    if value is not None and not USER_NAME.match(value):
        raise ValueError(f"{value!r} is not a user name (letters, digits, '.', '-', '_'; at most 32)")
    return value


def parse_every(text):
    """'5m' / '30s' / '0.5s' / '6h' / '1d' / 300 -> seconds (a whole number when it is one)."""
    if isinstance(text, (int, float)):
        seconds = text
    else:
        match = _EVERY.match(str(text))
        if not match:
            raise ValueError(f"every: {text!r} is not an interval like 30s, 5m, 6h or 1d")
        seconds = float(match.group(1)) * _UNIT_SECONDS[(match.group(2) or "s")[0]]
        seconds = int(seconds) if seconds == int(seconds) else seconds
    if seconds <= 0:
        raise ValueError("every: the interval must be positive")
    return seconds


class SchedulerSettings(Section):
    """`scheduler:` how jobs get installed and where run state is kept."""

    backend: str = "cron"
    cron_user: str | None = None
    cron_file: Path | None = None
    systemd_dir: Path = Path("/etc/systemd/system")
    randomized_delay_sec: int = 30
    state_dir: Path | None = None
    sync_cron_interval: int = 5

    @model_validator(mode="before")
    @classmethod
    def _no_control_characters(cls, value):
        return refuse_control_characters(value)

    @field_validator("cron_user")
    @classmethod
    def _cron_user(cls, value):
        return _user_name(value)

    @field_validator("backend")
    @classmethod
    def _backend(cls, value):
        if value not in ("cron", "systemd"):
            raise ValueError("backend must be cron or systemd")
        return value

    @field_validator("sync_cron_interval")
    @classmethod
    def _interval(cls, value):
        if not 0 < value <= 1440:
            raise ValueError("SYNC_CRON_INTERVAL must be a number of minutes between 1 and 1440")
        return value

    @field_validator("cron_file")
    @classmethod
    def _cron_file_name(cls, value):
        # cron ignores files in /etc/cron.d whose names contain dots or other characters
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", value.name):
            raise ValueError("cron.d file names may contain only letters, digits, - and _ (cron skips others)")
        return value


class Job(Section):
    """One scheduled job: what to run and when (exactly one of every, cron, on_calendar).

    An entry without `command` changes a plugin's default job of that name (`enabled: false`, another
    `every:`), keeping what it does not set.
    """

    command: list[str] | None = None
    every: str | int | float | None = None
    cron: str | None = None
    on_calendar: str | None = None
    user: str | None = None
    env_file: Path | None = None
    timeout: int | None = None
    enabled: bool = True
    description: str = ""

    @model_validator(mode="before")
    @classmethod
    def _no_control_characters(cls, value):
        return refuse_control_characters(value)

    @field_validator("user")
    @classmethod
    def _user(cls, value):
        return _user_name(value)

    @field_validator("command", mode="before")
    @classmethod
    def _split(cls, value):
        if value is None:
            return value
        if isinstance(value, str):
            value = shlex.split(value)
        if not value:
            raise ValueError("command must not be empty")
        return value

    @field_validator("every")
    @classmethod
    def _every(cls, value):
        if value is not None:
            parse_every(value)
        return value

    @field_validator("cron")
    @classmethod
    def _cron(cls, value):
        if value is not None:
            from croniter import croniter

            if len(value.split()) != 5 or not croniter.is_valid(value):
                raise ValueError(f"cron: {value!r} is not a valid five-field cron expression "
                                 f"(minute hour day-of-month month day-of-week)")
        return value

    @model_validator(mode="after")
    def _exactly_one_timing(self):
        given = [k for k in TIMING_KEYS if getattr(self, k) is not None]
        if len(given) > 1 or (not given and self.command is not None):
            raise ValueError("give exactly one of every, cron or on_calendar"
                             + (f" (got {', '.join(given)})" if given else ""))
        return self

    @property
    def every_seconds(self):
        return parse_every(self.every) if self.every is not None else None

    def timing(self):
        if self.every is not None:
            return f"every {self.every}"
        if self.cron is not None:
            return f"cron {self.cron}"
        return f"OnCalendar {self.on_calendar}"


class Schedules(RootModel[dict[str, Job]]):
    """`schedules:` job name -> job."""

    root: dict[str, Job] = {}

    @field_validator("root")
    @classmethod
    def _names(cls, value):
        for name in value:
            if not JOB_NAME.match(name):
                raise ValueError(f"job name {name!r}: use letters, digits, - and _ (it names cron lines and units)")
        return value
