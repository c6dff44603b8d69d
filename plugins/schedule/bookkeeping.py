"""What one run of a job records (its log, its run state), shared by `schedule exec` and its quick answer.

Kept free of click, pydantic and the plugins so that a scheduled run that has nothing to do can be
answered from a stamp (dbdeck.quick) at the cost of one interpreter start.
"""

import os
import sys
import time
from pathlib import Path

from dbdeck import output

ROTATE_BYTES = 5 * 1024 * 1024


def now_iso():
    return output.timestamp()


def someone_watches():
    """A terminal or journald (systemd) shows the job's output as it comes; cron mails only failures."""
    return sys.stdout.isatty() or bool(os.environ.get("JOURNAL_STREAM"))


def rotate(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if path.stat().st_size > ROTATE_BYTES:
            os.replace(path, path.with_name(path.name + ".1"))
    except FileNotFoundError:
        pass


def open_log(path):
    rotate(path)
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640), "ab")


def header(started, name, printable_argv):
    return f"=== {started} job {name}: {printable_argv}\n".encode()


def footer(ended, status, duration, problem=None):
    return f"=== {ended} exit {status} in {duration:.2f}s{f': {problem}' if problem else ''}\n".encode()


def record_start(state, name, log_path, started):
    first = {} if state.entry(name).get("first_start") else {"first_start": started}
    state.update(name, last_start=started, last_end=None, last_exit_code=None, running_pid=os.getpid(),
                 log=str(log_path), **first)


def record_end(state, name, status, ended, duration):
    fields = dict(last_end=ended, last_exit_code=status, last_duration_s=duration, running_pid=None)
    if status == 0:
        fields["last_success"] = ended
    state.update(name, **fields)


def stamp_data(name, lock_dir, state_file, log_path, printable_argv):
    """What quick_replay needs to record a run of job `name` the way `schedule exec` does."""
    return {"job": name, "lock_dir": str(lock_dir), "state_file": str(state_file), "log": str(log_path),
            "argv": printable_argv}


def quick_replay(data):
    """The quick answer for `schedule exec JOB` (see dbdeck.quick): the job's lock, then the wrapped
    command's own quick answer; only when that answers is anything written, exactly as a full run
    would. None: let the full path run."""
    from dbdeck import quick
    from dbdeck.errors import LockBusy
    from dbdeck.lock import JobLock
    from dbdeck.state import StateFile

    name = data["job"]
    lock = JobLock(f"schedule-{name}", data["lock_dir"])
    try:
        lock.acquire()
    except LockBusy:
        return None  # the full path records and reports the skip
    try:
        started, clock = now_iso(), time.monotonic()
        lines = []
        status = quick.call_inner(data, lines.append)
        if status is None:
            return None
        duration = round(time.monotonic() - clock, 3)
        ended = now_iso()
        state, log_path = StateFile(data["state_file"]), Path(data["log"])
        record_start(state, name, log_path, started)
        text = "".join(f"{line}\n" for line in lines)
        with open_log(log_path) as output:
            output.write(header(started, name, data["argv"]) + text.encode() + footer(ended, status, duration))
        if someone_watches():
            sys.stdout.write(text)
            sys.stdout.flush()
        record_end(state, name, status, ended, duration)
        return status
    finally:
        lock.release()
