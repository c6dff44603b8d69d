import json
import os
import stat

import pytest
import yaml

pytestmark = pytest.mark.integration


def test_sandbox_up_status_down(dbdeck_bin, workdir):
    box = workdir / "sandbox"
    up = dbdeck_bin("sandbox", "up", "--dir", box, timeout=300)
    assert up.returncode == 0, up.stderr
    status = dbdeck_bin("sandbox", "status", "--dir", box, "--format", "json")
    assert status.returncode == 0, status.stderr
    servers = {s["name"]: s for s in json.loads(status.stdout)["servers"]}
    assert set(servers) == {"prod", "dev", "primary", "standby", "tenant"}
    assert all(s["running"] for s in servers.values())
    assert servers["standby"]["in_recovery"] is True and servers["primary"]["in_recovery"] is False

    config = box / "dbdeck.yaml"
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
