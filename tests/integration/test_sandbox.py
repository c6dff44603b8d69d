import json
import os
import stat
from pathlib import Path

import pytest
import yaml

from ..conftest import CONTAINER_PREFIX

pytestmark = pytest.mark.integration


def test_sandbox_up_status_down(dbdeck_bin, workdir):
    box = workdir / "sandbox"
    up = dbdeck_bin("sandbox", "up", "--dir", box, timeout=300)
    assert up.returncode == 0, up.stderr
    status = dbdeck_bin("sandbox", "status", "--dir", box, "--format", "json")
    assert status.returncode == 0, status.stderr
    servers = {s["name"]: s for s in json.loads(status.stdout)["servers"]}
    assert set(servers) == {"prod", "dev", "conecta-postgres", "conecta-postgres-replica", "tenant"}
    assert all(s["running"] for s in servers.values())
    assert servers["conecta-postgres-replica"]["in_recovery"] is True
    assert servers["conecta-postgres"]["in_recovery"] is False

    config = box / "dbdeck.yaml"
    assert f"# Use it with: dbdeck --config {config} <command>" in config.read_text()  # the --dir given
    endpoints = yaml.safe_load(config.read_text())["endpoints"]
    assert endpoints["prod"]["role"] == "production"
    for name, ep in endpoints.items():
        secret = ep["password_file"]
        assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
        assert open(secret).read().strip() not in config.read_text()

    checked = dbdeck_bin("--config", config, "--format", "json", "endpoints")
    assert checked.returncode == 0, checked.stderr
    assert all(row["reachable"] for row in json.loads(checked.stdout))

    sample = dbdeck_bin("--config", config, "endpoints", "prod")
    assert "production" in sample.stdout

    # the sandbox's config wires local-sync: prod's sample contacts into the MariaDB tenant
    synced = dbdeck_bin("--config", config, "local-sync", "--format", "json")
    assert synced.returncode == 0, synced.stderr
    tables = json.loads(synced.stdout)["instances"][0]["tables"]
    assert tables["wpp_contacts"]["rows"] == 1000 and tables["wpp_contacts"]["mode"] == "full"

    # and sync-databases: prod's perfis against crm_external on dev's server, a change on each side
    from dbdeck.cli import App

    assert dbdeck_bin("--config", config, "sync-databases", "setup").returncode == 0
    app = App()
    app.config_path = str(config)
    app.endpoint("prod").execute("UPDATE perfis SET nome = 'from prod' WHERE id = 2")
    app.endpoint("external").execute("UPDATE perfis SET nome = 'from external' WHERE id = 1001")
    rounds = dbdeck_bin("--config", config, "sync-databases", "run")
    assert rounds.returncode == 0, rounds.stderr
    assert app.endpoint("external").query("SELECT nome FROM perfis WHERE id = 2")[0]["nome"] == "from prod"
    assert app.endpoint("prod").query("SELECT nome FROM perfis WHERE id = 1001")[0]["nome"] == "from external"

    again = dbdeck_bin("sandbox", "up", "--dir", box)
    assert again.returncode == 0, again.stderr

    down = dbdeck_bin("sandbox", "down", "--dir", box)
    assert down.returncode == 0 and not box.exists()
    gone = dbdeck_bin("sandbox", "status", "--dir", box, "--format", "json")
    assert gone.returncode == 1 and json.loads(gone.stdout)["servers"] == []


def test_sandbox_restarts_stopped_servers(dbdeck_bin, workdir):
    box = workdir / "sandbox-restart"
    assert dbdeck_bin("sandbox", "up", "--dir", box, "--only", "prod", "--no-sample-data").returncode == 0
    try:
        from dbdeck.plugins.sandbox.sandbox import Sandbox
        from dbdeck.run import Runner

        Sandbox(box, Runner()).server("prod").stop()
        down = dbdeck_bin("sandbox", "status", "--dir", box)
        assert down.returncode == 1 and "STOPPED" in down.stdout
        assert dbdeck_bin("sandbox", "up", "--dir", box, "--only", "prod").returncode == 0
        assert dbdeck_bin("sandbox", "status", "--dir", box).returncode == 0
    finally:
        dbdeck_bin("sandbox", "down", "--dir", box)


def test_a_deep_sandbox_directory_gets_its_sockets_where_they_fit(dbdeck_bin, workdir):
    """A unix socket path holds 107 bytes: under a deep --dir the servers' sockets go to a new directory
    in /tmp, recorded in state.json, and `sandbox down` removes it with the server."""
    box = workdir / ("deep-" + "d" * 60) / "sandbox"
    assert len(str(box / "data" / "prod.run" / ".s.PGSQL.65535")) > 107
    up = dbdeck_bin("sandbox", "up", "--dir", box, "--only", "prod", "--no-sample-data")
    assert up.returncode == 0, up.stderr
    try:
        socket_dir = json.loads((box / "state.json").read_text())["servers"]["prod"]["socket_dir"]
        assert socket_dir.startswith("/tmp/dbdeck-prod-") and list(Path(socket_dir).glob(".s.PGSQL.*"))
        assert stat.S_IMODE(os.stat(socket_dir).st_mode) == 0o700
        status = dbdeck_bin("sandbox", "status", "--dir", box, "--format", "json")
        assert status.returncode == 0 and json.loads(status.stdout)["servers"][0]["running"], status.stdout
    finally:
        down = dbdeck_bin("sandbox", "down", "--dir", box)
    assert down.returncode == 0 and not box.exists() and not Path(socket_dir).exists()


def test_dry_run_starts_and_deletes_nothing(dbdeck_bin, workdir):
    box = workdir / "sandbox-dry"
    up = dbdeck_bin("sandbox", "up", "--dir", box, "--dry-run")
    assert up.returncode == 0 and "[dry-run] would create and start prod" in up.stdout
    assert not box.exists()
    assert dbdeck_bin("sandbox", "up", "--dir", box, "--only", "dev", "--no-sample-data").returncode == 0
    try:
        down = dbdeck_bin("sandbox", "down", "--dir", box, "--dry-run")
        assert down.returncode == 0 and "[dry-run] would stop dev" in down.stdout
        assert box.exists() and dbdeck_bin("sandbox", "status", "--dir", box).returncode == 0
    finally:
        dbdeck_bin("sandbox", "down", "--dir", box)


def test_sandbox_with_the_seeds_containers_serves_the_seeds_own_way(dbdeck_bin, workdir, crm_containers):
    """The seeds' `docker exec crm-postgres ...`: prefixed names, so it runs beside the suite's containers."""
    import subprocess

    box = workdir / "sandbox-containers"
    prefix = f"sbx{CONTAINER_PREFIX}"
    env = {"DBDECK_SANDBOX_CONTAINER_PREFIX": prefix}
    up = dbdeck_bin("sandbox", "up", "--dir", box, "--only", "dev", "--with-containers", env=env, timeout=300)
    assert up.returncode == 0, up.stderr
    try:
        status = json.loads(dbdeck_bin("sandbox", "status", "--dir", box, "--format", "json").stdout)
        containers = {s["name"]: s for s in status["servers"] if s["kind"] == "container"}
        assert containers["prod-container"]["host"] == f"{prefix}crm-postgres" and containers["prod-container"]["running"]
        seed_way = box / "seed-way.yaml"
        seed_way.write_text(f"dbdeck:\n  run_dir: {box}/run\n  state_dir: {box}/seed-state\n")
        done = dbdeck_bin("--config", seed_way, "sync-prod-to-dev", env={
            "PROD_DB_CONTAINER": f"{prefix}crm-postgres", "DEV_DB_CONTAINER": f"{prefix}crm-postgres-dev"}, timeout=300)
        assert done.returncode == 0, done.stderr
        rows = subprocess.run(["docker", "exec", f"{prefix}crm-postgres-dev", "psql", "-U", "postgres", "-d",
                               "crm_development", "-Atc", "SELECT count(*) FROM contacts"],
                              capture_output=True, text=True, check=True).stdout.strip()
        assert rows == "1500"
    finally:
        down = dbdeck_bin("sandbox", "down", "--dir", box)
    assert down.returncode == 0
    gone = subprocess.run(["docker", "inspect", f"{prefix}crm-postgres"], capture_output=True)
    assert gone.returncode != 0
