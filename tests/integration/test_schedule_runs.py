"""The installed artefacts, executed verbatim: the crontab line under cron's environment from /, a real
cron daemon running it, the systemd unit's ExecStart. Each checks the job's effect (dev equals prod),
that a success prints nothing (cron mails output), and that status then shows the run."""

import json
import os
import shlex
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import BIN, _start_postgres, machine_wide, wait_for

# its tests share module-scoped servers and build on each other's state: one worker runs them all, in order
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("test_schedule_runs")]

CRON_ENVIRONMENT = {"HOME": "/root", "LOGNAME": "root", "SHELL": "/bin/sh", "PATH": "/usr/bin:/bin"}
SYSTEMD_ENVIRONMENT = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin", "LANG": "C.UTF-8",
                       "INVOCATION_ID": "0123456789abcdef0123456789abcdef", "JOURNAL_STREAM": "8:12345"}


@pytest.fixture(scope="module")
def prod_dev(workdir):
    prod = _start_postgres(workdir, "cron-prod", stock=True)
    dev = _start_postgres(workdir, "cron-dev", stock=True)
    prod.server.psql("CREATE DATABASE app;")
    dev.server.psql("CREATE DATABASE app_dev;")
    prod.server.psql("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL);"
                     "INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 500) g;", database="app")
    yield prod, dev
    prod.server.destroy()
    dev.server.destroy()


def write_config(directory, prod, dev, scheduler=""):
    secrets = directory / "secrets"
    secrets.mkdir(exist_ok=True)
    for name, cluster in (("prod", prod), ("dev", dev)):
        (secrets / name).write_text(cluster.password)
        os.chmod(secrets / name, 0o600)
    config = directory / "dbdeck.yaml"
    config.write_text(f"""
dbdeck:
  run_dir: {directory}/run
  state_dir: {directory}/state
endpoints:
  prod: {{host: 127.0.0.1, port: {prod.port}, user: postgres, password_file: {secrets}/prod, database: app,
          role: production}}
  dev: {{host: 127.0.0.1, port: {dev.port}, user: postgres, password_file: {secrets}/dev, database: app_dev,
         role: development}}
sync_prod_to_dev:
  source: prod
  target: dev
scheduler:
{scheduler or '  backend: cron'}
""")
    return config


def items(cluster, database):
    return cluster.endpoint(database).query("SELECT id, name FROM items ORDER BY id")


def as_cron_runs_it(command, cwd="/"):
    return subprocess.run(["/bin/sh", "-c", command], env=CRON_ENVIRONMENT, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_setup_sync_cron_line_runs_under_crons_bare_environment(prod_dev, tmp_path, dbdeck_bin):
    prod, dev = prod_dev
    cron_file = tmp_path / "cron.d" / "dbdeck"
    config = write_config(tmp_path, prod, dev, f"  cron_file: {cron_file}")
    # installed from another directory, with a relative --config: the line must not depend on either
    installed = dbdeck_bin("--config", config.name, "setup-sync-cron", "--install", command="dbdeck", cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr
    line = [l for l in cron_file.read_text().splitlines() if l.endswith("# dbdeck:job=sync-prod-to-dev")][0]
    minute, hour, day, month, weekday, user, command = line.split(None, 6)
    assert (minute, user) == ("*/5", "root") and f"--config {config}" in command

    first = as_cron_runs_it(command)
    assert first.returncode == 0 and first.stdout == first.stderr == "", first.stderr
    assert items(dev, "app_dev") == items(prod, "app")
    status = dbdeck_bin("--config", config, "setup-sync-cron", "--status")
    assert status.returncode == 0 and "exit 0" in status.stdout and "never run" not in status.stdout

    # the usual case: prod unchanged, a quick silent skip; the job's log says so
    again = as_cron_runs_it(command)
    assert again.returncode == 0 and again.stdout == again.stderr == ""
    assert "prod unchanged" in (tmp_path / "state" / "log" / "job-sync-prod-to-dev.log").read_text()

    # between runs: prod changes and the config moves dev's password to another file
    prod.endpoint("app").execute("UPDATE items SET name = 'renamed' WHERE id = 7")
    (tmp_path / "secrets" / "dev-new").write_text(dev.password)
    os.chmod(tmp_path / "secrets" / "dev-new", 0o600)
    config.write_text(config.read_text().replace("secrets/dev,", "secrets/dev-new,"))
    changed = as_cron_runs_it(command)
    assert changed.returncode == 0 and changed.stdout == changed.stderr == ""
    assert items(dev, "app_dev") == items(prod, "app")

    # a failing run is what cron mails: one line saying why plus the end of the output, no secret
    (tmp_path / "secrets" / "dev-new").write_text("wrong-password")
    prod.endpoint("app").execute("UPDATE items SET name = 'renamed again' WHERE id = 8")
    failed = as_cron_runs_it(command)
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.startswith("dbdeck: job sync-prod-to-dev failed with exit 1")
    assert "password authentication failed" in failed.stderr
    assert dev.password not in failed.stderr and prod.password not in failed.stderr
    report = dbdeck_bin("--config", config, "--format", "json", "status")
    assert report.returncode == 1
    job = [r for r in json.loads(report.stdout) if r["kind"] == "job" and r["name"] == "sync-prod-to-dev"][0]
    assert job["state"] == "failing" and job["data"]["last_exit_code"] == 1 and job["next"] is not None

    (tmp_path / "secrets" / "dev-new").write_text(dev.password)
    assert as_cron_runs_it(command).returncode == 0
    assert items(dev, "app_dev") == items(prod, "app")
    text = dbdeck_bin("--config", config, "status")
    assert text.returncode == 0, text.stdout
    header, *rows = text.stdout.splitlines()
    assert header.split() == ["KIND", "NAME", "STATE", "LAST", "NEXT", "DETAIL"]
    assert any(r.split()[:3] == ["job", "sync-prod-to-dev", "ok"] for r in rows)
    assert any(r.split()[:3] == ["sync", "sync-prod-to-dev", "ok"] for r in rows)
    metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(
                   dbdeck_bin("--config", config, "status", "--format", "prometheus").stdout)
               for s in family.samples}
    assert metrics[("dbdeck_job_last_exit_code", (("dbdeck_job", "sync-prod-to-dev"),))] == 0
    assert metrics[("dbdeck_job_running", (("dbdeck_job", "sync-prod-to-dev"),))] == 0
    last_success = metrics[("dbdeck_job_last_success_timestamp_seconds", (("dbdeck_job", "sync-prod-to-dev"),))]
    assert time.time() - last_success < 120
    assert metrics[("dbdeck_status_problems", ())] == 0


@pytest.fixture
def root_crontab():
    """Root's crontab, restored afterwards (the seed's setup-sync-cron writes the user's own crontab)."""
    if os.geteuid() != 0:
        pytest.fail("this test installs into root's crontab and runs cron: it needs root", pytrace=False)
    with machine_wide("root-crontab"):
        before = subprocess.run(["crontab", "-l"], capture_output=True, text=True)
        yield
        if before.returncode == 0:
            subprocess.run(["crontab", "-"], input=before.stdout, text=True, check=True)
        else:
            subprocess.run(["crontab", "-r"], capture_output=True)


@pytest.fixture
def cron_daemon():
    """The system's cron if it runs, else Debian's cron started in the foreground for this test."""
    if subprocess.run(["pgrep", "-x", "cron"], capture_output=True).returncode == 0:
        yield None
        return
    daemon = subprocess.Popen(["cron", "-f", "-L", "15"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield daemon
    daemon.terminate()
    daemon.wait(timeout=10)


def test_a_real_cron_daemon_runs_the_seeds_job(prod_dev, tmp_path, dbdeck_bin, root_crontab, cron_daemon):
    prod, dev = prod_dev
    config = write_config(tmp_path, prod, dev)
    prod.endpoint("app").execute("UPDATE items SET name = 'from cron' WHERE id = 3")
    installed = dbdeck_bin("--config", config, "setup-sync-cron", "--install", env={"SYNC_CRON_INTERVAL": "1"})
    assert installed.returncode == 0 and "will not see it" not in installed.stderr, installed.stderr
    table = subprocess.run(["crontab", "-l"], capture_output=True, text=True).stdout
    assert "* * * * * " in table or "*/1 * * * * " in table
    state = tmp_path / "state" / "schedule-state.json"

    def ran():
        try:
            return json.loads(state.read_text())["sync-prod-to-dev"].get("last_end") is not None
        except (FileNotFoundError, KeyError, ValueError):
            return False

    assert wait_for(ran, timeout=150, pause=1), "cron did not run the job within two minutes"
    assert items(dev, "app_dev") == items(prod, "app")
    status = dbdeck_bin("--config", config, "--format", "json", "setup-sync-cron", "--status")
    assert status.returncode == 0 and json.loads(status.stdout)["last_exit_code"] == 0
    removed = dbdeck_bin("--config", config, "setup-sync-cron", "--remove")
    assert removed.returncode == 0 and "dbdeck:job=" not in subprocess.run(["crontab", "-l"], capture_output=True,
                                                                            text=True).stdout


def test_systemd_units_exec_start_runs_the_job(prod_dev, tmp_path, dbdeck_bin):
    prod, dev = prod_dev
    root = tmp_path / "root"
    config = write_config(tmp_path, prod, dev, "  backend: systemd")
    installed = dbdeck_bin("--config", config, "schedule", "install", "--systemd-root", root)
    assert installed.returncode == 0, installed.stderr
    units = root / "etc" / "systemd" / "system"
    assert (units / "timers.target.wants" / "dbdeck-sync-prod-to-dev.timer").is_symlink()
    assert not (units / "dbdeck-local-sync.timer").exists()  # local_sync is not configured: no job for it
    exec_start = [l for l in (units / "dbdeck@.service").read_text().splitlines() if l.startswith("ExecStart=")][0]
    argv = shlex.split(exec_start.removeprefix("ExecStart=").replace("%i", "sync-prod-to-dev").replace("%%", "%"))
    prod.endpoint("app").execute("UPDATE items SET name = 'from systemd' WHERE id = 4")
    done = subprocess.run(argv, env=SYSTEMD_ENVIRONMENT, cwd="/", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "sync complete" in done.stdout  # journald gets the output
    assert items(dev, "app_dev") == items(prod, "app")
    rows = json.loads(dbdeck_bin("--config", config, "--format", "json", "schedule", "status",
                                 "--systemd-root", root).stdout)
    assert rows[0]["job"] == "sync-prod-to-dev" and rows[0]["last_exit_code"] == 0
    assert rows[0]["installed"].endswith("(enabled)")


def imported_modules(importtime_stderr):
    return {line.rsplit("|", 1)[1].strip() for line in importtime_stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


def test_a_skipped_cron_run_is_answered_without_loading_the_tool_and_only_while_nothing_changed(
        prod_dev, tmp_path, dbdeck_bin):
    """The crontab line, verbatim under cron's environment, with `python -X importtime` to see what a
    run loads: an unchanged prod is answered from the stamp without click, pydantic, psycopg or the
    plugins; a prod change, a config change (new anonymisation rule), a recreated dev or a failure each
    go through the full path, which copies (or fails) as it should."""
    from dbdeck import quick

    prod, dev = prod_dev
    cron_file = tmp_path / "cron.d" / "dbdeck"
    config = write_config(tmp_path, prod, dev, f"  cron_file: {cron_file}")
    assert dbdeck_bin("--config", config, "setup-sync-cron", "--install").returncode == 0
    line = [l for l in cron_file.read_text().splitlines() if l.endswith("# dbdeck:job=sync-prod-to-dev")][0]
    command = line.split(None, 6)[6]
    traced = command.replace(" -m dbdeck.launch ", " -X importtime -m dbdeck.launch ", 1)
    assert traced != command
    job_log = tmp_path / "state" / "log" / "job-sync-prod-to-dev.log"
    heavy = {"click", "pydantic", "pluggy", "yaml"}  # the full path always loads these (psycopg only if it connects)
    never_quick = heavy | {"psycopg"}
    stamp = quick.stamp_path(["dbdeck", "--config", str(config), "schedule", "exec", "sync-prod-to-dev"])

    def run_traced():
        done = as_cron_runs_it(traced)
        assert done.returncode == 0 and done.stdout == "", done.stderr[-2000:]
        return imported_modules(done.stderr)

    assert heavy <= run_traced()  # the first run copies through the full path
    assert items(dev, "app_dev") == items(prod, "app")
    assert stamp.is_file() and stat_mode(stamp) == 0o600
    assert prod.password not in stamp.read_text() and dev.password not in stamp.read_text()

    runs_before = job_log.read_text().count("prod unchanged")
    assert not never_quick & run_traced()  # answered from the stamp
    assert job_log.read_text().count("prod unchanged") == runs_before + 1
    report = json.loads(dbdeck_bin("--config", config, "--format", "json", "status").stdout)
    job = [r for r in report if r["kind"] == "job" and r["name"] == "sync-prod-to-dev"][0]
    assert job["state"] == "ok" and job["data"]["last_exit_code"] == 0
    result = [r for r in report if r["kind"] == "sync" and r["name"] == "sync-prod-to-dev"][0]
    assert result["state"] == "ok" and result["detail"].startswith("prod unchanged since")

    prod.endpoint("app").execute("UPDATE items SET name = 'changed under a stamp' WHERE id = 3")
    assert heavy <= run_traced()
    assert items(dev, "app_dev") == items(prod, "app")
    assert not never_quick & run_traced()

    # privacy: a rule added to a config that has already synced applies on the very next run
    config.write_text(config.read_text().replace("  target: dev\n", "  target: dev\n  anonymize:\n"
                                                 "    items.name: {rule: fixed, value: hidden}\n"))
    assert heavy <= run_traced()
    assert {r["name"] for r in items(dev, "app_dev")} == {"hidden"}
    assert not never_quick & run_traced()

    # a recreated dev (docker compose down -v, a dropped database) is refilled with prod unchanged
    dev.server.psql("DROP DATABASE app_dev WITH (FORCE); CREATE DATABASE app_dev;")
    assert heavy <= run_traced()
    assert len(items(dev, "app_dev")) == len(items(prod, "app"))
    assert "is not the database the last sync produced" in job_log.read_text()

    # a run killed mid-swap: dev closed and a staging database left; the probe sees it, the full path repairs
    dev.server.psql("ALTER DATABASE app_dev WITH ALLOW_CONNECTIONS false; CREATE DATABASE app_dev__dbdeck_staging;")
    assert heavy <= run_traced()
    databases = {r["datname"]: r["datallowconn"] for r in dev.endpoint("postgres").query(
        "SELECT datname, datallowconn FROM pg_database")}
    assert databases["app_dev"] is True and "app_dev__dbdeck_staging" not in databases
    assert not never_quick & run_traced()

    # a failing run leaves no stamp behind, so the next run decides anew
    (tmp_path / "secrets" / "dev").write_text("wrong-password")
    failed = as_cron_runs_it(command)
    assert failed.returncode == 1 and "password authentication failed" in failed.stderr
    assert not stamp.exists()
    (tmp_path / "secrets" / "dev").write_text(dev.password)
    assert heavy <= run_traced() and stamp.is_file()


def stat_mode(path):
    return os.stat(path).st_mode & 0o777
