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


def test_a_lock_directory_planted_by_someone_else_is_refused_and_nothing_is_written(tmp_path):
    """The /tmp/dbdeck-<uid> fallback lives in a directory anyone can write: another user could create
    it first (to hold our locks) or make it, or a lock file, a symlink (to have the lock write clobber
    one of our files)."""
    from dbdeck.errors import DbdeckError

    shared = tmp_path / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "job.lock").write_text("precious\n")

    (shared / "linked").symlink_to(victim)
    with pytest.raises(DbdeckError, match="not a plain directory"):
        JobLock("job", shared / "linked").acquire()

    planted = shared / "planted"
    planted.mkdir(mode=0o777)
    os.chmod(planted, 0o777)
    if os.geteuid() == 0:
        os.chown(planted, 65534, 65534)
    with pytest.raises(DbdeckError, match="it must be yours and 0700"):
        JobLock("job", planted).acquire()

    ours = JobLock("job", shared / "ours").acquire()  # created private, then used
    assert oct(os.stat(shared / "ours").st_mode & 0o777) == "0o700"
    ours.release()
    (shared / "ours" / "other.lock").symlink_to(victim / "job.lock")
    with pytest.raises(DbdeckError, match="a symlink: refused"):
        JobLock("other", shared / "ours").acquire()
    assert (victim / "job.lock").read_text() == "precious\n"


def test_state_file_of_the_wrong_shape_reads_as_no_state(tmp_path):
    from dbdeck.state import StateFile

    path = tmp_path / "state.json"
    for damaged in ("[1, 2]", '"text"', "{bad json", '{"job": "not an object"}'):
        path.write_text(damaged)
        state = StateFile(path)
        assert state.entry("job") == {}
        state.update("job", last="ok")
        assert state.entry("job") == {"last": "ok"}
