import os
import pwd

import pytest

from dbdeck import secrets
from dbdeck.errors import CommandFailed, CommandTimeout
from dbdeck.run import Runner, printable
from tests.conftest import default_signals


def test_runs_and_captures():
    result = Runner().run(["sh", "-c", "echo out; echo err >&2"])
    assert result.ok and result.stdout == "out\n" and result.stderr == "err\n"


def test_secret_passed_by_environment_not_argv():
    result = Runner().run(["sh", "-c", 'printf %s "$PGPASSWORD"'], env={"PGPASSWORD": "env-only-secret"})
    assert result.stdout == "env-only-secret"
    assert "env-only-secret" not in " ".join(result.argv)


def test_failure_is_masked_and_not_chained():
    secrets.register("argv-secret-value")
    with pytest.raises(CommandFailed) as err:
        Runner().run(["sh", "-c", "echo 'bad password argv-secret-value' >&2; exit 3", "argv-secret-value"])
    assert err.value.returncode == 3
    assert "argv-secret-value" not in str(err.value)
    assert "***" in str(err.value) and "exit status 3" in str(err.value)
    assert err.value.__cause__ is None and (err.value.__context__ is None or err.value.__suppress_context__)


def test_url_password_in_argv_is_masked_in_errors():
    with pytest.raises(CommandFailed) as err:
        Runner().run(["sh", "-c", "exit 1", "postgresql://u:urlpass@h/db"])
    assert "urlpass" not in str(err.value)


def test_check_false_returns_status():
    assert Runner().run(["sh", "-c", "exit 4"], check=False).returncode == 4


def test_timeout():
    with pytest.raises(CommandTimeout, match="timed out after 0.3s"):
        Runner().run(["sleep", "5"], timeout=0.3)


def test_missing_program():
    with pytest.raises(CommandFailed, match="program not found: no-such-program-xyz"):
        Runner().run(["no-such-program-xyz"])


def test_dry_run_prints_and_does_not_run(tmp_path):
    lines = []
    target = tmp_path / "created"
    result = Runner(dry_run=True, echo=lines.append).run(["touch", target], env={"PGPASSWORD": "dry-secret"})
    assert result.dry_run and not target.exists()
    assert lines == [f"[dry-run] would run: PGPASSWORD=*** touch {target}"]


def test_read_only_commands_still_run_in_dry_run():
    assert Runner(dry_run=True).run(["echo", "hi"], read_only=True).stdout == "hi\n"


def test_stdin_and_stdout_file(tmp_path):
    out = tmp_path / "out"
    with open(out, "wb") as handle:
        Runner().run(["cat"], stdin="streamed\n", stdout=handle)
    assert out.read_text() == "streamed\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="as_user switches users only when dbdeck runs as root")
def test_as_user_runs_as_that_user():
    user = pwd.getpwuid(65534).pw_name
    assert Runner().run(["id", "-un"], as_user=user).stdout.strip() == user


def test_printable_quotes_and_masks():
    assert printable(["psql", "-c", "select 1"], {"PGPASSWORD": "x"}) == "PGPASSWORD=*** psql -c 'select 1'"


def test_daemon_outlives_call(tmp_path):
    daemon = Runner().start_daemon(["sleep", "30"], log_path=tmp_path / "log")
    try:
        assert daemon.pid > 0 and daemon.poll() is None
    finally:
        os.kill(daemon.pid, 9)


def test_pipeline_streams_between_stages():
    result = Runner().pipeline([(["sh", "-c", "printf 'a\\nb\\nc\\n'"], {}), (["wc", "-l"], {})])
    assert result.stdout.strip() == "3"


def test_pipeline_fails_like_pipefail_and_masks(tmp_path):
    with pytest.raises(CommandFailed) as err:
        Runner().pipeline([(["sh", "-c", 'echo "auth failed for $PGPASSWORD" >&2; exit 2'], {"PGPASSWORD": "pipe-pw"}),
                           (["cat"], {})])
    assert err.value.returncode == 2 and "pipe-pw" not in str(err.value) and "auth failed for ***" in str(err.value)


def test_pipeline_to_file_and_dry_run(tmp_path):
    out = tmp_path / "out"
    with open(out, "wb") as handle:
        Runner().pipeline([(["printf", "x" * 100000], {}), (["gzip", "-c"], {})], stdout=handle)
    assert out.stat().st_size > 0
    lines = []
    Runner(dry_run=True, echo=lines.append).pipeline([(["pg_dump"], {"PGPASSWORD": "s"}), (["pg_restore"], {})])
    assert lines == ["[dry-run] would run: PGPASSWORD=*** pg_dump | pg_restore"]


def test_pipeline_timeout_kills_every_stage():
    with pytest.raises(CommandTimeout):
        Runner().pipeline([(["sleep", "10"], {}), (["cat"], {})], timeout=0.3)


STOP_WHILE_STARTING = r"""
import os, signal, subprocess, sys, time
import sh
from dbdeck.run import Runner

# the stop arrives after the fork, before the runner learned the pid: the narrowest window there is
original = sh.Command.__call__
def call_then_stop(self, *args, **kwargs):
    started = original(self, *args, **kwargs)
    print(started.pid, flush=True)
    os.kill(os.getpid(), signal.SIGINT if sys.argv[2] == "int" else signal.SIGTERM)
    return started
sh.Command.__call__ = call_then_stop

def terminated(*_):
    raise SystemExit(143)
signal.signal(signal.SIGTERM, terminated)
try:
    Runner().%s
except (KeyboardInterrupt, SystemExit) as exc:
    print("stopped", type(exc).__name__, flush=True)
"""


@pytest.mark.parametrize("signal_name", ["int", "term"])
def test_a_stop_arriving_while_a_program_starts_stops_that_program_too(signal_name):
    import signal
    import subprocess
    import sys
    import time

    script = STOP_WHILE_STARTING % 'run(["sleep", "60"], timeout=120)'
    done = subprocess.run([sys.executable, "-c", script, "x", signal_name], capture_output=True, text=True,
                          timeout=60, preexec_fn=default_signals)
    pid_line, said = done.stdout.splitlines()[:2]
    assert said.startswith("stopped"), done.stdout + done.stderr
    pid = int(pid_line)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the program started as the stop arrived runs on")


def test_programs_started_after_termination_is_held_can_still_be_stopped(tmp_path):
    """hold_termination() blocks SIGTERM for the rest of the run; a child inherits the signal mask, so
    without care every program started after it (a server, a receiver, a daemon) ignores SIGTERM for good."""
    import subprocess
    import sys

    # grep reads its own mask (a shell would not do: dash clears the mask it inherits)
    script = r"""
import sys, time
from dbdeck.run import Runner, hold_termination
hold_termination()
runner = Runner()
own = ["grep", "SigBlk", "/proc/self/status"]
print(runner.run(own).stdout.split()[1])
print(runner.pipeline([(own, None)]).stdout.split()[1])
print(runner.probe([(own, None)])[0].stdout.split()[1])
daemon = runner.start_daemon(own, log_path=sys.argv[1])
time.sleep(1)
print(open(sys.argv[1]).read().split()[1])
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "daemon")], capture_output=True, text=True,
                          timeout=60)
    masks = done.stdout.split()
    assert len(masks) == 4, done.stdout + done.stderr
    sigterm = 1 << (15 - 1)
    assert all(int(mask, 16) & sigterm == 0 for mask in masks), masks
