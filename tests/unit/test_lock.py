import os
import signal
import subprocess
import sys

import click
import pytest

from dbdeck.cli import pass_app, run_command, _with_global_options
from dbdeck.errors import EXIT_LOCKED, LockBusy
from dbdeck.lock import JobLock

HOLD = """
import sys, time
from dbdeck.lock import JobLock
lock = JobLock('job', sys.argv[1]).acquire()
print('locked', flush=True)
time.sleep(60)
"""


def hold_in_child(run_dir):
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_second_holder_is_refused_with_holder_details(tmp_path):
    child = hold_in_child(tmp_path)
    try:
        with pytest.raises(LockBusy) as err:
            JobLock("job", tmp_path).acquire()
        assert f"pid {child.pid}" in str(err.value) and "already running" in str(err.value)
        assert JobLock("job", tmp_path).holder()["pid"] == child.pid
    finally:
        child.kill()
        child.wait()


def test_lock_is_released_when_holder_is_killed(tmp_path):
    child = hold_in_child(tmp_path)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    with JobLock("job", tmp_path) as lock:
        assert lock.holder()["pid"] == os.getpid()
    assert JobLock("job", tmp_path).holder() is None


def test_lock_names_are_made_safe(tmp_path):
    assert JobLock("../etc/passwd", tmp_path).path.parent == tmp_path


def test_cli_exit_code_when_locked(tmp_path):
    @click.command("locked-job")
    @pass_app
    def locked_job(app):
        with app.lock("locked-job"):
            click.echo("ran")

    config = tmp_path / "dbdeck.yaml"
    config.write_text(f"dbdeck:\n  run_dir: {tmp_path}\n")
    command = _with_global_options(locked_job)
    child = subprocess.Popen([sys.executable, "-c", HOLD.replace("'job'", "'locked-job'"), str(tmp_path)],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    try:
        assert run_command(command, ["--config", str(config)], prog_name="locked-job") == EXIT_LOCKED
    finally:
        child.kill()
        child.wait()
    assert run_command(command, ["--config", str(config)], prog_name="locked-job") == 0
