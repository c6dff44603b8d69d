"""The cron backend: a user's crontab (via `crontab`) or a file in /etc/cron.d.

In a user's crontab only dbdeck's own lines, each ending in `# dbdeck:job=<name>`, are ever added,
changed or removed; every other line is written back byte for byte.
"""

import os
import pwd
import shlex
from pathlib import Path

from dbdeck.errors import DbdeckError
from dbdeck.state import write_atomic

from .timing import cron_expression

MARKER = "# dbdeck:job="


def marker(name):
    return f"{MARKER}{name}"


def job_of(line):
    """The job name a crontab line belongs to, or None for lines that are not dbdeck's."""
    head, sep, tail = line.rpartition(MARKER)
    return tail.strip() if sep and tail.strip() and " " not in tail.strip() else None


def _escape(command):
    return command.replace("%", r"\%")  # an unescaped % ends the command in crontab syntax


class CronBackend:
    def __init__(self, app, settings, runner):
        self.app = app
        self.settings = settings
        self.runner = runner

    # --- reading and writing the tables ----------------------------------------------------------
    def _user_of(self, job=None):
        return (job and job.user) or self.settings.cron_user or pwd.getpwuid(os.geteuid()).pw_name

    def _crontab_argv(self, user):
        me = pwd.getpwuid(os.geteuid()).pw_name
        return ["crontab", "-u", user] if user != me else ["crontab"]

    def read_user_table(self, user):
        result = self.runner.run([*self._crontab_argv(user), "-l"], check=False, read_only=True)
        if result.returncode == 0:
            return result.stdout
        if "no crontab for" in result.stderr:
            return ""
        raise DbdeckError(f"cannot read the crontab of {user}: {result.stderr.strip()}")

    def write_user_table(self, user, text):
        self.runner.run([*self._crontab_argv(user), "-"], stdin=text)

    def line_for(self, name, job, with_user):
        from .jobs import dbdeck_argv

        command = _escape(shlex.join(dbdeck_argv(self.app, "schedule", "exec", name)))
        user = f" {self._user_of(job)}" if with_user else ""
        return f"{cron_expression(name, job)}{user} {command} {marker(name)}"

    # --- install / remove / status ---------------------------------------------------------------
    def install(self, jobs, prune):
        """Add or update the jobs' lines; with prune, drop dbdeck lines of jobs no longer configured."""
        lines = {name: self.line_for(name, job, with_user=bool(self.settings.cron_file))
                 for name, job in jobs.items() if job.enabled}
        if self.settings.cron_file:
            return self._write_cron_file(lines, keep_others=not prune)
        changed = []
        for user in sorted({self._user_of(job) for job in jobs.values()}):
            mine = {n: line for n, line in lines.items() if self._user_of(jobs[n]) == user}
            drop = set(jobs) - set(mine)
            changed += self._edit_user_table(user, mine, drop, prune)
        return changed

    def remove(self, names):
        """Remove the lines of these jobs (all dbdeck lines when names is None)."""
        if self.settings.cron_file:
            path = Path(self.settings.cron_file)
            if not path.exists():
                return []
            current = self._parse_file(path.read_text())
            keep = {} if names is None else {n: line for n, line in current.items() if n not in names}
            return self._write_cron_file(keep, keep_others=False, existing=current)
        changed = []
        for user in self._users_to_scan(names):
            changed += self._edit_user_table(user, {}, set(names or ()), prune=names is None)
        return changed

    def installed(self, jobs):
        """name -> the installed line (or None)."""
        if self.settings.cron_file:
            path = Path(self.settings.cron_file)
            current = self._parse_file(path.read_text()) if path.exists() else {}
            return {name: current.get(name) for name in jobs}
        found = {}
        for user in sorted({self._user_of(job) for job in jobs.values()}):
            table = {job_of(line): line for line in self.read_user_table(user).splitlines() if job_of(line)}
            for name, job in jobs.items():
                if self._user_of(job) == user:
                    found[name] = table.get(name)
        return found

    def _users_to_scan(self, names):
        jobs = self._configured()
        selected = [jobs[n] for n in (names or jobs) if n in jobs]
        users = {self._user_of(j) for j in selected} or {self._user_of()}
        return sorted(users)

    def _configured(self):
        from .jobs import all_jobs

        return all_jobs(self.app)

    def _edit_user_table(self, user, wanted, drop, prune):
        old = self.read_user_table(user)
        out, seen = [], set()
        for line in old.splitlines():
            name = job_of(line)
            if name is None:
                out.append(line)
            elif name in wanted:
                if name not in seen:
                    out.append(wanted[name])
                    seen.add(name)
            elif name in drop or prune:
                continue
            else:
                out.append(line)
        out += [wanted[n] for n in sorted(wanted) if n not in seen]
        new = "\n".join(out) + "\n" if out else ""
        if new == (old if old.endswith("\n") or not old else old + "\n"):
            return []
        if self.runner.dry_run:
            self.runner.say(f"crontab of {user} would become:\n{new.rstrip() or '(empty)'}")
        self.write_user_table(user, new)
        return [f"crontab of {user}"]

    @staticmethod
    def _parse_file(text):
        return {job_of(line): line for line in text.splitlines() if job_of(line)}

    def _write_cron_file(self, lines, keep_others, existing=None):
        path = Path(self.settings.cron_file)
        if existing is None:
            existing = self._parse_file(path.read_text()) if path.exists() else {}
        merged = {**existing, **lines} if keep_others else dict(lines)
        if not merged:
            if not path.exists():
                return []
            if self.runner.dry_run:
                self.runner.say(f"would remove {path}")
            else:
                path.unlink()
            return [str(path)]
        header = "# Written by `dbdeck schedule install`; edit the dbdeck config, not this file.\n" \
                 "SHELL=/bin/sh\nPATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
        text = header + "".join(f"{merged[n]}\n" for n in sorted(merged))
        if path.exists() and path.read_text() == text:
            return []
        if self.runner.dry_run:
            self.runner.say(f"would write {path}:\n{text.rstrip()}")
            return [str(path)]
        write_atomic(path, text, mode=0o644)
        return [str(path)]
