import json
import os
import pwd
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ..conftest import CHECKOUT_TAG, WORKER_INDEX, wait_for

# its tests share module-scoped servers and build on each other's state: one worker runs them all, in order
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("test_schedule")]
# its own user per checkout and worker: the suites beside it rewrite theirs
CRON_USER = f"dbdeck-cron-{CHECKOUT_TAG}{WORKER_INDEX}"


@pytest.fixture(scope="module")
def cron_user():
    """A throwaway OS user whose crontab the tests may rewrite."""
    if os.geteuid() != 0:
        pytest.fail("the crontab tests create a throwaway user and need root", pytrace=False)
    try:
        pwd.getpwnam(CRON_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", CRON_USER],
                       check=True)
    yield CRON_USER
    subprocess.run(["crontab", "-u", CRON_USER, "-r"], capture_output=True)
    subprocess.run(["userdel", CRON_USER], capture_output=True)


def crontab_of(user):
    done = subprocess.run(["crontab", "-u", user, "-l"], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else ""


def write_config(tmp_path, body):
    path = tmp_path / "dbdeck.yaml"
    path.write_text(f"dbdeck:\n  run_dir: {tmp_path}/run\nscheduler:\n  state_dir: {tmp_path}/state\n" + body)
    return path


FOREIGN = "# a line the user wrote\nMAILTO=ops@example.com\n17 3 * * * /usr/local/bin/backup.sh  --keep   7\n"


def test_cron_install_is_idempotent_and_touches_only_its_lines(cron_user, tmp_path, dbdeck_bin):
    subprocess.run(["crontab", "-u", cron_user, "-"], input=FOREIGN, text=True, check=True)
    config = write_config(tmp_path, f"  cron_user: {cron_user}\nschedules:\n"
                                    "  sync:\n    command: sync-prod-to-dev --force\n    every: 5m\n"
                                    "  weekly:\n    command: [dbdeck, plugins]\n    cron: '0 4 * * 0'\n")
    dry = dbdeck_bin("--config", config, "schedule", "install", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "*/5 * * * *" in dry.stdout and crontab_of(cron_user) == FOREIGN

    first = dbdeck_bin("--config", config, "schedule", "install")
    assert first.returncode == 0, first.stderr
    table = crontab_of(cron_user)
    assert table.startswith(FOREIGN)
    lines = table[len(FOREIGN):].splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("*/5 * * * * ") and lines[0].endswith("schedule exec sync # dbdeck:job=sync")
    assert lines[1].startswith("0 4 * * 0 ") and lines[1].endswith("# dbdeck:job=weekly")
    assert f"--config {config}" in lines[0]

    again = dbdeck_bin("--config", config, "schedule", "install")
    assert again.returncode == 0 and again.stdout.strip() == "nothing to change"
    assert crontab_of(cron_user) == table

    # a job dropped from the config loses its line on the next full install; foreign lines stay
    config.write_text(config.read_text().split("  weekly:")[0])
    assert dbdeck_bin("--config", config, "schedule", "install").returncode == 0
    assert crontab_of(cron_user) == FOREIGN + lines[0] + "\n"

    removed = dbdeck_bin("--config", config, "schedule", "remove")
    assert removed.returncode == 0 and crontab_of(cron_user) == FOREIGN


def test_bad_schedule_changes_nothing(cron_user, tmp_path, dbdeck_bin):
    subprocess.run(["crontab", "-u", cron_user, "-"], input=FOREIGN, text=True, check=True)
    for timing, message in (("cron: '*/5 * * *'", "not a valid five-field cron expression"),
                            ("every: 45s", "finer than cron's one-minute resolution"),
                            ("every: 7m", "does not divide an hour or a day evenly")):
        config = write_config(tmp_path, f"  cron_user: {cron_user}\nschedules:\n  bad:\n    command: x\n"
                                        f"    {timing}\n")
        done = dbdeck_bin("--config", config, "schedule", "install")
        assert done.returncode == 2, (timing, done.stderr)
        assert message in done.stderr and done.stderr.strip().count("\n") == 0
        assert crontab_of(cron_user) == FOREIGN


def test_cron_d_file(tmp_path, dbdeck_bin):
    cron_file = tmp_path / "cron.d" / "dbdeck"
    config = write_config(tmp_path, f"  cron_file: {cron_file}\nschedules:\n  sync:\n    command: x\n"
                                    "    every: 10m\n    user: postgres\n")
    assert dbdeck_bin("--config", config, "schedule", "install").returncode == 0
    text = cron_file.read_text()
    assert "*/10 * * * * postgres " in text and "PATH=" in text
    assert oct(cron_file.stat().st_mode & 0o777) == "0o644"
    status = dbdeck_bin("--config", config, "--format", "json", "schedule", "status")
    assert json.loads(status.stdout)[0]["installed"].startswith("*/10 * * * * postgres")
    assert dbdeck_bin("--config", config, "schedule", "remove").returncode == 0
    assert not cron_file.exists()


def test_setup_sync_cron_like_the_seed(cron_user, tmp_path, dbdeck_bin):
    subprocess.run(["crontab", "-u", cron_user, "-r"], capture_output=True)
    config = write_config(tmp_path, f"  cron_user: {cron_user}\n")
    env = {"DBDECK_CONFIG": str(config), "SYNC_CRON_INTERVAL": "10"}
    missing = dbdeck_bin("--status", command="setup-sync-cron", env=env)
    assert missing.returncode == 1 and "not installed" in missing.stdout
    installed = dbdeck_bin("--install", command="setup-sync-cron", env=env)
    assert installed.returncode == 0, installed.stderr
    table = crontab_of(cron_user)
    assert table.startswith("*/10 * * * * ") and "schedule exec sync-prod-to-dev # dbdeck:job=sync-prod-to-dev" in table
    assert dbdeck_bin("--install", command="setup-sync-cron", env=env).stdout.startswith("already installed")
    status = dbdeck_bin("--status", command="setup-sync-cron", env=env)
    assert status.returncode == 0 and "*/10 * * * *" in status.stdout
    assert dbdeck_bin("--remove", command="setup-sync-cron", env=env).returncode == 0
    assert crontab_of(cron_user) == ""
    usage = dbdeck_bin(command="setup-sync-cron", env=env)
    assert usage.returncode == 2 and "--install" in usage.stderr
    bad = dbdeck_bin("--install", command="setup-sync-cron", env={**env, "SYNC_CRON_INTERVAL": "often"})
    assert bad.returncode == 2 and "scheduler.sync_cron_interval" in bad.stderr and crontab_of(cron_user) == ""


def test_systemd_units_render_verify_enable_and_remove(tmp_path, dbdeck_bin):
    root = tmp_path / "root"
    config = write_config(tmp_path, "  randomized_delay_sec: 45\nschedules:\n"
                                    "  sync:\n    command: sync-prod-to-dev\n    every: 5m\n    user: postgres\n"
                                    "  report:\n    command: [dbdeck, plugins]\n    on_calendar: 'Mon *-*-* 06:00'\n")
    done = dbdeck_bin("--config", config, "schedule", "install", "--backend", "systemd", "--systemd-root", root)
    assert done.returncode == 0, done.stderr
    units = root / "etc" / "systemd" / "system"
    timer = (units / "dbdeck-sync.timer").read_text()
    assert "OnCalendar=*:0/5\n" in timer and "Persistent=true" in timer and "RandomizedDelaySec=45" in timer
    assert "Unit=dbdeck@sync.service" in timer
    assert (units / "dbdeck@sync.service.d" / "dbdeck.conf").read_text() == "[Service]\nUser=postgres\n"
    assert (units / "timers.target.wants" / "dbdeck-report.timer").is_symlink()
    for job in ("sync", "report"):
        verify = subprocess.run(["systemd-analyze", "verify", units / f"dbdeck-{job}.timer",
                                 units / f"dbdeck@{job}.service"], capture_output=True, text=True)
        assert verify.returncode == 0, verify.stderr
    status = json.loads(dbdeck_bin("--config", config, "--format", "json", "schedule", "status", "--backend",
                                   "systemd", "--systemd-root", root).stdout)
    assert all(r["installed"].endswith("(enabled)") for r in status)
    assert dbdeck_bin("--config", config, "schedule", "install", "--backend", "systemd", "--systemd-root",
                      root).stdout.strip() == "nothing to change"
    assert dbdeck_bin("--config", config, "schedule", "remove", "--backend", "systemd", "--systemd-root",
                      root).returncode == 0
    assert sorted(p.name for p in units.rglob("*") if p.is_file() or p.is_symlink()) == []


def test_systemd_bad_calendar_writes_nothing(tmp_path, dbdeck_bin):
    root = tmp_path / "root"
    config = write_config(tmp_path, "schedules:\n  x:\n    command: x\n    on_calendar: 'every tuesday-ish'\n")
    done = dbdeck_bin("--config", config, "schedule", "install", "--backend", "systemd", "--systemd-root", root)
    assert done.returncode == 2 and "OnCalendar 'every tuesday-ish' is not valid" in done.stderr
    assert not root.exists()


def test_exec_records_state_and_refuses_overlap(tmp_path, dbdeck_bin):
    env_file = tmp_path / "job.env"
    env_file.write_text("GREETING=from-env-file\n")
    config = write_config(tmp_path, "schedules:\n"
                                    f"  slow:\n    command: [sh, -c, 'echo $GREETING; sleep 1.5']\n    every: 5m\n"
                                    f"    env_file: {env_file}\n"
                                    "  broken:\n    command: [sh, -c, 'exit 3']\n    every: 5m\n")
    first = subprocess.Popen([str(Path(__file__).parents[2] / "bin" / "dbdeck"), "--config", str(config),
                              "schedule", "exec", "slow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.8)
    second = dbdeck_bin("--config", config, "schedule", "exec", "slow")
    # not a terminal, not journald: what cron sees. A skip and a success print nothing (no mail).
    assert second.returncode == 75 and second.stdout == second.stderr == ""
    assert first.wait(timeout=20) == 0 and first.stdout.read() == "" and first.stderr.read() == ""
    job_log = (tmp_path / "state" / "log" / "job-slow.log").read_text()
    assert "from-env-file\n" in job_log and "exit 0 in" in job_log
    assert f"skipped: schedule-slow is already running (pid {first.pid}" in job_log
    broken = dbdeck_bin("--config", config, "schedule", "exec", "broken")
    assert broken.returncode == 3 and broken.stdout == ""
    assert broken.stderr.startswith("dbdeck: job broken failed with exit 3") and "job-broken.log" in broken.stderr
    # under systemd the output goes to the journal as it comes
    shown = dbdeck_bin("--config", config, "schedule", "exec", "slow", env={"JOURNAL_STREAM": "8:1234"})
    assert shown.returncode == 0 and "from-env-file" in shown.stdout
    status = dbdeck_bin("--config", config, "--format", "json", "schedule", "status")
    assert status.returncode == 1  # `broken` is failing
    rows = {r["job"]: r for r in json.loads(status.stdout)}
    assert rows["slow"]["last_exit_code"] == 0 and rows["slow"]["last_duration_s"] >= 1.5
    assert rows["slow"]["last_skipped"] is not None and rows["slow"]["state"] == "ok"
    assert rows["broken"]["last_exit_code"] == 3 and rows["broken"]["state"] == "failing"
    unknown = dbdeck_bin("--config", config, "schedule", "exec", "nope")
    assert unknown.returncode == 2 and "no scheduled job named 'nope'" in unknown.stderr


def test_foreground_scheduler(tmp_path):
    from dbdeck.lock import JobLock

    finished_at = tmp_path / "slow-finished-at"
    config = write_config(tmp_path, "schedules:\n"
                                    f"  slow:\n    command: [sh, -c, 'sleep 1.2; date +%s.%N > {finished_at}']\n"
                                    "    every: 0.3s\n"
                                    "  failing:\n    command: [sh, -c, 'exit 3']\n    every: 0.4s\n")
    scheduler = subprocess.Popen([str(Path(__file__).parents[2] / "bin" / "dbdeck"), "--config", str(config),
                                  "schedule", "run"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(scheduler.stderr), daemon=True)
    reader.start()

    def seen_enough():  # what a busy machine takes longer to reach: two failures and one skipped run
        text = "".join(lines)
        return text.count("job failing: FAILED with exit 3") >= 2 and "skipping this run" in text

    assert wait_for(seen_enough, timeout=30, pause=0.05), "".join(lines)
    slow_lock = JobLock("schedule-slow", tmp_path / "run")
    deadline = time.monotonic() + 15
    while slow_lock.holder() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # send the signal while a run of `slow` is in progress
    assert slow_lock.holder() is not None
    signalled_at = time.time()
    scheduler.send_signal(signal.SIGTERM)
    assert scheduler.wait(timeout=20) == 0
    reader.join(timeout=10)
    log = "".join(lines)
    assert "job slow: started" in log
    assert "still going" in log and "skipping this run" in log
    assert log.count("job failing: FAILED with exit 3") >= 2
    assert "received SIGTERM: no new runs; waiting for" in log and "scheduler: stopped" in log
    after_signal = log.split("received SIGTERM")[1]
    assert "job slow: exit 0" in after_signal and "started" not in after_signal
    # the run in progress at SIGTERM was allowed to finish, after the signal
    assert float(finished_at.read_text()) > signalled_at
    state = json.loads((tmp_path / "state" / "schedule-state.json").read_text())
    assert state["slow"]["last_exit_code"] == 0 and state["failing"]["last_exit_code"] == 3
    assert state["slow"]["running_pid"] is None


def test_foreground_dry_run_prints_the_plan_and_runs_nothing(tmp_path, dbdeck_bin):
    marker = tmp_path / "ran"
    config = write_config(tmp_path, f"schedules:\n  touch:\n    command: [touch, {marker}]\n    every: 0.2s\n")
    done = dbdeck_bin("--config", config, "schedule", "run", "--dry-run", timeout=20)
    assert done.returncode == 0 and f"[dry-run] would run touch (every 0.2s): touch {marker}" in done.stdout
    assert not marker.exists()


def test_a_dbdeck_job_past_its_timeout_is_stopped_and_exits_124(tmp_path, dbdeck_bin):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = write_config(tmp_path, "schedules:\n  relay:\n    command: [webhook-relay, --primary, 'http://127.0.0.1:9',"
                                    f" --listen, '127.0.0.1:{port}']\n    every: 5m\n    timeout: 2\n")
    done = dbdeck_bin("--config", config, "schedule", "exec", "relay", timeout=60)
    assert done.returncode == 124 and "timed out after 2s" in done.stderr
    job_log = (tmp_path / "state" / "log" / "job-relay.log").read_text()
    assert "webhook-relay on http://127.0.0.1:" in job_log and "webhook-relay stopping (signal 15)" in job_log
    assert json.loads((tmp_path / "state" / "schedule-state.json").read_text())["relay"]["last_exit_code"] == 124


@pytest.mark.parametrize("job_yaml, key", [
    ('    command: x\n    every: 10m\n    user: "postgres\\n* * * * * root touch /tmp/injected"\n', "user"),
    ('    command: x\n    every: 10m\n    user: "postgres\\nExecStartPre=/bin/touch /tmp/injected"\n', "user"),
    ('    command: ["x", "a\\n* * * * * root touch /tmp/injected"]\n    every: 10m\n', "command.1"),
    ('    command: x\n    every: 10m\n    env_file: "a.env\\nExecStartPre=/bin/true"\n', "env_file"),
    ('    command: x\n    on_calendar: "daily\\nExecStartPre=/bin/true"\n', "on_calendar"),
    ('    command: x\n    every: 10m\n    description: "d\\nExecStartPre=/bin/true"\n', "description"),
    ('    command: x\n    every: 10m\n    user: "root; touch /tmp/injected"\n', "user"),
])
def test_a_value_that_would_inject_a_line_is_refused_and_nothing_is_written(tmp_path, dbdeck_bin, job_yaml, key):
    cron_file = tmp_path / "cron.d" / "dbdeck"
    root = tmp_path / "root"
    config = write_config(tmp_path, f"  cron_file: {cron_file}\nschedules:\n  sync:\n" + job_yaml)
    check = dbdeck_bin("--config", config, "config", "check")
    assert check.returncode == 2 and "schedules.sync" in check.stderr and f"{key}:" in check.stderr, check.stderr
    assert len(check.stderr.strip().splitlines()) == 1
    for backend in (["--backend", "cron"], ["--backend", "systemd", "--systemd-root", root]):
        done = dbdeck_bin("--config", config, "schedule", "install", *backend)
        assert done.returncode == 2, done.stderr
    assert not cron_file.exists() and not root.exists() and not os.path.exists("/tmp/injected")
