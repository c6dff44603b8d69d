"""The seed's container pair (conecta-postgres / conecta-postgres-replica) driven by the docker driver:
setup-master, rebuild-replica filling an empty replica container, check, failover and rebuilding the old
primary's container as the new standby. The data directories are mount points, as in the seed."""

import json
import os
import shlex
import shutil
import subprocess

import pytest
import yaml

from ..conftest import BIN, COMPOSE_DIR, CONTAINER_PREFIX, _docker_ready, new_password, require, wait_for

# its tests share module-scoped servers and build on each other's state: one worker runs them all, in order
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("test_replication_docker")]

PRIMARY = f"{CONTAINER_PREFIX}conecta-postgres"
REPLICA = f"{CONTAINER_PREFIX}conecta-postgres-replica"


@pytest.fixture(scope="module")
def conecta(workdir, docker_compose_command):
    from dbdeck.plugins.sandbox.servers import free_port, give_to, os_user_for

    _docker_ready()
    base = workdir / "conecta"
    give_to(base, None, 0o755)
    user = os_user_for("postgres")
    password = new_password().replace("'", "")
    password_file = base / "initdb.pw"
    password_file.write_text(password + "\n")
    if user:
        import pwd

        entry = pwd.getpwnam(user)
        os.chown(password_file, entry.pw_uid, entry.pw_gid)
    os.chmod(password_file, 0o600)
    env = {**os.environ, "CONECTA_PRIMARY_DATA": str(give_to(base / "primary-data", user, 0o700)),
           "CONECTA_REPLICA_DATA": str(give_to(base / "replica-data", user, 0o700)),
           "CONECTA_PASSWORD_FILE": str(password_file), "CONECTA_PRIMARY_PORT": str(free_port()),
           "CONECTA_REPLICA_PORT": str(free_port()), "DBDECK_TEST_CONTAINER_PREFIX": CONTAINER_PREFIX}
    project = f"dbdeck-conecta-{os.getpid()}"
    compose_file = COMPOSE_DIR / "conecta-postgres.yml"
    compose = [*shlex.split(docker_compose_command), "-p", project, "-f", str(compose_file)]
    app_env = base / "app.env"
    app_env.write_text(f"DATABASE_URL=postgresql://conecta:senha@127.0.0.1:{env['CONECTA_PRIMARY_PORT']}/conecta_db\n")
    subprocess.run([*compose, "up", "-d"], env=env, check=True, capture_output=True)
    config = base / "dbdeck.yaml"
    node = lambda container, port: {  # noqa: E731
        "endpoint": {"host": "127.0.0.1", "port": int(port), "user": "postgres", "password": password,
                     "database": "postgres", "connect_timeout": 3},
        "driver": "docker", "container": container, "app_address": f"127.0.0.1:{port}"}
    config.write_text(yaml.safe_dump({
        "dbdeck": {"run_dir": str(base / "run"), "state_dir": str(base / "state")},
        "replication": {
            "nodes": {"conecta-postgres": node(PRIMARY, env["CONECTA_PRIMARY_PORT"]),
                      "conecta-postgres-replica": node(REPLICA, env["CONECTA_REPLICA_PORT"])},
            "primary": "conecta-postgres", "replication_password_file": str(base / "secrets" / "replicator"),
            "log_dir": str(base / "logs"), "wait_timeout": 60,
            "after_promote": {"env_files": [str(app_env)], "compose_file": str(compose_file),
                              "compose_project": project, "restart_services": ["api-gateway"]}}}))

    def run(command, *args):
        return subprocess.run([str(BIN / command), "--config", str(config), *args], capture_output=True,
                              text=True, timeout=300)

    def sql(port_key, statement):
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=env[port_key], user="postgres", password=password,
                             dbname="postgres", autocommit=True, connect_timeout=3) as conn:
            cur = conn.execute(statement)
            return cur.fetchall() if cur.description else None

    def answers(port_key):
        try:
            return sql(port_key, "SELECT 1") == [(1,)]
        except Exception:
            return False

    assert wait_for(lambda: answers("CONECTA_PRIMARY_PORT"), timeout=60), "conecta-postgres did not start"
    yield run, sql, answers, app_env, env
    subprocess.run([*compose, "down", "-v", "-t", "5"], env=env, capture_output=True)
    shutil.rmtree(base, ignore_errors=True)


def _started_at(name):
    return subprocess.run(["docker", "inspect", "-f", "{{.State.StartedAt}}", CONTAINER_PREFIX + name],
                          capture_output=True, text=True, check=True).stdout.strip()


def _replica_count(sql):
    try:
        return sql("CONECTA_REPLICA_PORT", "SELECT count(*) FROM contatos")[0][0]
    except Exception:  # not up yet, or the table not replayed yet
        return None


def _safe(probe):
    try:
        return probe()
    except Exception:
        return False


def _check(run):
    result = run("check-replication", "--format", "json")
    return result.returncode, json.loads(result.stdout)


def test_container_pair_setup_rebuild_check_failover_and_rejoin(conecta):
    run, sql, answers, app_env, env = conecta
    applied = run("setup-master", "--apply-settings")  # the README's way, on a stock server
    assert applied.returncode == 1 and "RESTART the primary for wal_log_hints" in applied.stderr, applied.stderr
    subprocess.run(["docker", "restart", "-t", "30", PRIMARY], check=True, capture_output=True)
    assert wait_for(lambda: answers("CONECTA_PRIMARY_PORT"), timeout=60)
    setup = run("setup-master")
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert sql("CONECTA_PRIMARY_PORT", "SHOW wal_log_hints") == [("on",)]
    rebuild = run("rebuild-replica")
    assert rebuild.returncode == 0, rebuild.stdout + rebuild.stderr
    assert "container conecta-postgres-replica" in rebuild.stdout or REPLICA in rebuild.stdout
    code, report = _check(run)
    assert code == 0, report
    assert report["primary"] == "conecta-postgres"
    assert report["standbys"][0]["state"] == "streaming"

    sql("CONECTA_PRIMARY_PORT", "CREATE TABLE contatos AS SELECT generate_series(1, 500) AS id")
    assert wait_for(lambda: _replica_count(sql) == 500, timeout=30)

    subprocess.run(["docker", "stop", "-t", "10", REPLICA], check=True, capture_output=True)
    code, report = _check(run)
    assert code == 2 and any("conecta-postgres-replica is down" in p for p in report["problems"])
    subprocess.run(["docker", "start", REPLICA], check=True, capture_output=True)
    assert wait_for(lambda: _check(run)[0] == 0, timeout=30)

    refused = run("promote-replica")
    assert refused.returncode == 1 and "still answers" in refused.stderr
    subprocess.run(["docker", "kill", PRIMARY], check=True, capture_output=True)  # SIGKILL: the master died
    started = _started_at("conecta-api-gateway")
    promoted = run("promote-replica", "--update-connections")
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    assert f"@127.0.0.1:{env['CONECTA_REPLICA_PORT']}/conecta_db" in app_env.read_text()
    assert _started_at("conecta-api-gateway") != started  # the seed's "docker compose restart" step
    sql("CONECTA_REPLICA_PORT", "INSERT INTO contatos SELECT generate_series(501, 600)")

    rejoin = run("rebuild-replica")  # the stopped old primary's container becomes the standby
    assert rejoin.returncode == 0, rejoin.stdout + rejoin.stderr
    assert "rebuilding conecta-postgres " in rejoin.stdout
    code, report = _check(run)
    assert code == 0, report
    assert report["primary"] == "conecta-postgres-replica"
    assert sql("CONECTA_PRIMARY_PORT", "SELECT pg_is_in_recovery(), count(*) FROM contatos") == [(True, 600)]


def test_container_pair_auto_failover_fences_and_rejoins(conecta):
    """After the first test the replica container is the primary: kill it, the monitor fails over to
    conecta-postgres and rejoins the killed container (restart policy off, pg_rewind in a helper container)."""
    import signal
    import time

    run, sql, answers, app_env, env = conecta
    code, report = _check(run)
    assert code == 0 and report["primary"] == "conecta-postgres-replica", report
    log_path = app_env.parent / "monitor.log"
    with open(log_path, "w") as log:
        monitor = subprocess.Popen([str(BIN / "auto-failover"), "--config", str(app_env.parent / "dbdeck.yaml")],
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: "monitoring primary" in log_path.read_text(), timeout=20), log_path.read_text()
        sql("CONECTA_REPLICA_PORT", "INSERT INTO contatos SELECT generate_series(601, 700)")
        subprocess.run(["docker", "kill", REPLICA], check=True, capture_output=True)
        assert wait_for(lambda: "rejoined" in log_path.read_text(), timeout=120), log_path.read_text()
        time.sleep(0.5)
    finally:
        monitor.send_signal(signal.SIGTERM)
        assert monitor.wait(timeout=60) == 0
    text = log_path.read_text()
    assert "FAILOVER: conecta-postgres is the primary" in text
    assert "rejoined as a standby of conecta-postgres (pg_rewind)" in text, text
    restart = subprocess.run(["docker", "inspect", "-f", "{{.HostConfig.RestartPolicy.Name}}", REPLICA],
                             capture_output=True, text=True).stdout.strip()
    assert restart in ("no", "")
    code, report = _check(run)
    assert code == 0 and report["primary"] == "conecta-postgres", report
    assert sql("CONECTA_REPLICA_PORT", "SELECT pg_is_in_recovery(), count(*) FROM contatos") == [(True, 700)]


def test_container_pair_backups_survive_a_failover_and_restore_into_a_stopped_container(conecta):
    """Barman on the host streams from the seed's containers (nothing installed in them). After kill -9 of
    the primary and promote-replica, Barman follows the new primary; a moment after the failover, before any
    new base backup, restores into the old primary's stopped container through its volume."""
    import time

    run, sql, answers, app_env, env = conecta
    require("barman", "barman")
    config_path = app_env.parent / "dbdeck.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["replication"]["backup"] = {"home": str(app_env.parent / "barman")}
    config_path.write_text(yaml.safe_dump(config))
    code, report = _check(run)
    assert code == 0 and report["primary"] == "conecta-postgres", report
    try:
        setup = run("dbdeck", "pitr", "setup")
        assert setup.returncode == 0, setup.stdout + setup.stderr
        sql("CONECTA_PRIMARY_PORT", "INSERT INTO contatos SELECT generate_series(701, 800)")
        subprocess.run(["docker", "kill", PRIMARY], check=True, capture_output=True)
        promoted = run("promote-replica")
        assert promoted.returncode == 0, promoted.stdout + promoted.stderr
        assert "backups follow the new primary" in promoted.stdout, promoted.stdout
        sql("CONECTA_REPLICA_PORT", "INSERT INTO contatos SELECT generate_series(801, 900)")
        time.sleep(1.2)
        moment = sql("CONECTA_REPLICA_PORT", "SELECT clock_timestamp()")[0][0].isoformat()
        time.sleep(1.2)
        sql("CONECTA_REPLICA_PORT", "INSERT INTO contatos SELECT generate_series(901, 1000)")

        restored = run("dbdeck", "pitr", "restore", "--to-time", moment, "--target", "conecta-postgres", "--yes")
        assert restored.returncode == 0, restored.stdout + restored.stderr
        subprocess.run(["docker", "start", PRIMARY], check=True, capture_output=True)
        assert wait_for(lambda: answers("CONECTA_PRIMARY_PORT"), timeout=60)
        # the old primary's node is not the pair's primary any more: the copy stays read-only, paused at the
        # restored moment (issue 29.1: a restore never makes a second primary)
        assert wait_for(lambda: _safe(lambda: sql("CONECTA_PRIMARY_PORT", "SELECT count(*), max(id) FROM contatos")
                                      == [(900, 900)]), timeout=60), \
            "rows up to the moment after the failover: the WAL chain crossed the timeline switch"
        assert sql("CONECTA_PRIMARY_PORT", "SELECT pg_is_in_recovery()") == [(True,)]
        code, report = _check(run)
        assert report["primary"] == "conecta-postgres-replica", report
        assert not any("SPLIT-BRAIN" in problem for problem in report["problems"]), report
        subprocess.run(["docker", "stop", "-t", "10", PRIMARY], check=True, capture_output=True)
        maintained = run("dbdeck", "pitr", "maintain", "--format", "json")
        assert maintained.returncode == 0, maintained.stdout + maintained.stderr
        assert not any("hole" in p for p in json.loads(maintained.stdout)["problems"])
    finally:
        subprocess.run(["pkill", "-f", f"directory={app_env.parent / 'barman'}"], check=False)
