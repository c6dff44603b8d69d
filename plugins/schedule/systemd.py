"""The systemd backend: dbdeck@.service plus one dbdeck-<job>.timer per job, from systemd/ templates."""

import sys
from pathlib import Path
from string import Template

from dbdeck.errors import ConfigError, DbdeckError
from dbdeck.state import write_atomic

from .timing import on_calendar

SERVICE = "dbdeck@.service"
TIMER_TEMPLATE = "dbdeck-job.timer"


def templates_dir():
    """systemd/ of the checkout, or the copy installed under <prefix>/share/dbdeck/systemd."""
    for candidate in (Path(__file__).resolve().parents[2] / "systemd",
                      Path(sys.prefix) / "share" / "dbdeck" / "systemd"):
        if (candidate / SERVICE).is_file():
            return candidate
    raise DbdeckError("systemd unit templates not found (expected systemd/dbdeck@.service)")


def timer_name(job_name):
    return f"dbdeck-{job_name}.timer"


class SystemdBackend:
    def __init__(self, app, settings, runner, root=None):
        self.app = app
        self.settings = settings
        self.runner = runner
        self.root = Path(root) if root else None
        self.unit_dir = self.root / "etc" / "systemd" / "system" if self.root else Path(settings.systemd_dir)

    def _systemd_running(self):
        return self.root is None and Path("/run/systemd/system").is_dir()

    def _systemctl(self, *args):
        if self._systemd_running():
            return ["systemctl", *args]
        return ["systemctl", f"--root={self.root or '/'}", *args]

    def render(self, jobs):
        """file name -> content for the service template, each timer, and per-job drop-ins."""
        from .jobs import dbdeck_argv

        exec_start = " ".join(_quote(a).replace("%", "%%") for a in dbdeck_argv(self.app, "schedule", "exec"))
        source = templates_dir()
        files = {SERVICE: Template((source / SERVICE).read_text()).substitute(exec_start=exec_start)}
        timer = Template((source / TIMER_TEMPLATE).read_text())
        for name, job in jobs.items():
            calendar = on_calendar(name, job)
            self._check_calendar(name, calendar)
            files[timer_name(name)] = timer.substitute(
                job=name, timing=job.timing(), on_calendar=calendar,
                randomized_delay_sec=self.settings.randomized_delay_sec)
            dropin = []
            if job.user:
                dropin.append(f"User={job.user}")
            if job.timeout:
                dropin.append(f"TimeoutStartSec={job.timeout}")
            if dropin:
                files[f"dbdeck@{name}.service.d/dbdeck.conf"] = "[Service]\n" + "\n".join(dropin) + "\n"
        return files

    def _check_calendar(self, name, expression):
        result = self.runner.run(["systemd-analyze", "calendar", expression], check=False, read_only=True)
        if result.returncode != 0:
            raise ConfigError(f"job {name}: OnCalendar {expression!r} is not valid: "
                              f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'rejected'}")

    def install(self, jobs, prune):
        enabled = {n: j for n, j in jobs.items() if j.enabled}
        files = self.render(enabled)  # every expression is validated before anything is written
        changed = []
        for relative, content in files.items():
            path = self.unit_dir / relative
            if path.exists() and path.read_text() == content:
                continue
            changed.append(str(path))
            if self.runner.dry_run:
                self.runner.say(f"would write {path}:\n{content.rstrip()}")
                continue
            write_atomic(path, content, mode=0o644)
        if not self.runner.dry_run:
            self.verify(enabled)
        stale = self._installed_jobs() - set(enabled) if prune else set(jobs) - set(enabled)
        changed += self.remove(sorted(stale & self._installed_jobs())) if stale else []
        if self._systemd_running():
            self.runner.run(self._systemctl("daemon-reload"))
        for name in sorted(enabled):
            args = ("enable", "--now", timer_name(name)) if self._systemd_running() else ("enable", timer_name(name))
            if not self._is_enabled(name):
                changed.append(f"enabled {timer_name(name)}")
            self.runner.run(self._systemctl(*args))
        return changed

    def verify(self, jobs):
        """systemd-analyze verify on each rendered timer and its service instance."""
        for name in jobs:
            result = self.runner.run(["systemd-analyze", "verify", self.unit_dir / timer_name(name),
                                      self.unit_dir / f"dbdeck@{name}.service"], check=False, read_only=True)
            problems = [line for line in result.stderr.splitlines() if "sysinit.target" not in line and line.strip()]
            if result.returncode != 0 or problems:
                raise DbdeckError(f"systemd-analyze verify rejected the units of job {name}:\n" + "\n".join(problems))

    def remove(self, names):
        names = sorted(self._installed_jobs()) if names is None else names
        changed = []
        for name in names:
            timer = self.unit_dir / timer_name(name)
            if not timer.exists():
                continue
            args = ("disable", "--now", timer_name(name)) if self._systemd_running() else ("disable", timer_name(name))
            self.runner.run(self._systemctl(*args))
            dropin = self.unit_dir / f"dbdeck@{name}.service.d" / "dbdeck.conf"
            for path in (timer, dropin):
                if path.exists():
                    changed.append(str(path))
                    if self.runner.dry_run:
                        self.runner.say(f"would remove {path}")
                    else:
                        path.unlink()
            if not self.runner.dry_run and dropin.parent.exists() and not any(dropin.parent.iterdir()):
                dropin.parent.rmdir()
        service = self.unit_dir / SERVICE
        if service.exists() and not self._installed_jobs() - set(names):  # no timer left that uses it
            changed.append(str(service))
            if self.runner.dry_run:
                self.runner.say(f"would remove {service}")
            else:
                service.unlink()
        return changed

    def installed(self, jobs):
        return {name: (str(self.unit_dir / timer_name(name)) + (" (enabled)" if self._is_enabled(name) else
                                                                 " (disabled)"))
                if (self.unit_dir / timer_name(name)).exists() else None for name in jobs}

    def _installed_jobs(self):
        if not self.unit_dir.is_dir():
            return set()
        return {p.name[len("dbdeck-"):-len(".timer")] for p in self.unit_dir.glob("dbdeck-*.timer")}

    def _is_enabled(self, name):
        link = self.unit_dir / "timers.target.wants" / timer_name(name)
        return link.is_symlink() or link.exists()  # under --root the link points inside the root


def _quote(arg):
    if any(c in arg for c in " \t\"'\\"):
        return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return arg
