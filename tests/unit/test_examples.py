from pathlib import Path

from dbdeck.cli import App

ROOT = Path(__file__).resolve().parents[2]


def test_example_config_validates_with_every_plugin_section():
    app = App()
    app.config_path = str(ROOT / "etc" / "dbdeck.yaml")
    loaded = app.config
    assert loaded.endpoint_config("prod").role == "production"
    assert loaded.endpoint_config("dev").container == "crm-postgres-dev"
    assert loaded.section("schedules").root["local-sync"].cron == "0 */6 * * *"
    assert loaded.section("scheduler").sync_cron_interval == 5


def test_example_config_honours_environment_defaults(monkeypatch):
    monkeypatch.setenv("DBDECK_RUN_DIR", "/tmp/x")
    monkeypatch.delenv("DBDECK_LOG_DIR", raising=False)
    app = App()
    app.config_path = str(ROOT / "etc" / "dbdeck.yaml")
    loaded = app.config
    assert str(loaded.core.run_dir) == "/tmp/x"
    assert str(loaded.core.log_dir) == "/var/log/dbdeck"


def test_every_console_script_has_a_bin_executable_and_back():
    import configparser

    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    scripts = {line.split("=")[0].strip() for line in parser["options.entry_points"]["console_scripts"].splitlines()
               if line.strip()}
    executables = {p.name for p in (ROOT / "bin").iterdir()}
    assert scripts == executables
    for name in scripts - {"dbdeck"}:
        assert f"dbdeck.launch {name} " in (ROOT / "bin" / name).read_text()
        from dbdeck import launch

        assert callable(getattr(launch, name.replace("-", "_")))


def test_replication_alert_rules_are_the_seeds_and_pass_promtool():
    import shutil
    import subprocess

    import pytest
    import yaml

    rules_file = ROOT / "etc" / "prometheus" / "replication-alerts.yml"
    if shutil.which("promtool") is None:
        pytest.fail("promtool is not installed: run scripts/bootstrap (apt-get install prometheus)", pytrace=False)
    result = subprocess.run(["promtool", "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    rules = {r["alert"]: r for r in yaml.safe_load(rules_file.read_text())["groups"][0]["rules"]}
    assert rules["PostgresReplicaOffline"]["expr"] == "absent(pg_stat_replication_replay_lsn)"
    assert rules["PostgresReplicationLagHigh"]["expr"] == "pg_replication_lag_seconds > 30"
    assert rules["PostgresReplicationLagCritical"]["expr"] == "pg_replication_lag_seconds > 300"
    # the metrics the rules use are the ones check-replication exports
    metrics = (ROOT / "plugins" / "replication" / "metrics.py").read_text()
    assert '"pg_replication_lag_seconds"' in metrics and 'f"pg_stat_replication_{kind}_lsn"' in metrics


def test_service_units_verify(tmp_path):
    """The shipped long-running units pass systemd-analyze verify (ExecStart pointed at this checkout)."""
    import shutil
    import subprocess

    import pytest

    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is not installed: run scripts/bootstrap (apt-get install systemd)", pytrace=False)
    for unit in ("dbdeck-replication-metrics.service", "dbdeck-webhook-relay.service",
                 "dbdeck-auto-failover.service", "dbdeck-local-sync-watch.service"):
        text = (ROOT / "systemd" / unit).read_text()
        text = text.replace("/usr/local/bin/", f"{ROOT}/bin/").replace("User=dbdeck", "User=root")
        (tmp_path / unit).write_text(text)
        result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit)], capture_output=True, text=True)
        assert result.returncode == 0 and not result.stderr.strip(), unit + ": " + result.stderr


def test_github_actions_example_deploys_with_one_call_and_a_concurrency_group():
    import yaml

    workflow = yaml.safe_load((ROOT / "etc" / "github-actions" / "deploy-production.yml").read_text())
    assert workflow["concurrency"] == {"group": "deploy-production", "cancel-in-progress": False}
    steps = workflow["jobs"]["deploy"]["steps"]
    runs = [step.get("run", "") for step in steps]
    assert any(run.startswith("deploy --env production") for run in runs)
    assert not any("<<" in run or "StrictHostKeyChecking=no" in run for run in runs)
    assert workflow["jobs"]["deploy"]["needs"] == "test"


def test_example_config_deploy_profiles_are_the_seeds_table():
    app = App()
    app.config_path = str(ROOT / "etc" / "dbdeck.yaml")
    deploy = app.config.section("deploy")
    production, staging = deploy.profile("production"), deploy.profile("staging")
    assert (production.branch, production.port, production.container) == ("main", 3001, "crm-backend")
    assert (staging.branch, staging.port, staging.container) == ("develop", 3002, "crm-backend-dev")
    assert production.backup and production.rollback and not staging.backup and not staging.rollback
    assert (production.health_attempts, staging.health_attempts) == (30, 20)
    assert production.health_interval == staging.health_interval == 5
    assert not production.rsync_delete and staging.rsync_delete
    assert production.compose_file == "docker-compose.production.yml"
    assert {"logs", "uploads", "certbot"} <= set(production.excludes)
    assert not {"logs", "uploads", "certbot"} & set(staging.excludes)
    assert production.database.name == "crm_whatsapp_saas" and production.database.user == "crm_user"


def test_dbdeck_alert_rules_pass_promtool_and_fire_when_they_should():
    import re
    import shutil
    import subprocess

    import pytest

    from dbdeck.status import METRIC_HELP

    directory = ROOT / "etc" / "prometheus"
    if shutil.which("promtool") is None:
        pytest.fail("promtool is not installed: run scripts/bootstrap (apt-get install prometheus)", pytrace=False)
    checked = subprocess.run(["promtool", "check", "rules", "dbdeck-alerts.yml"], cwd=directory,
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(["promtool", "test", "rules", "dbdeck-alerts.test.yml"], cwd=directory,
                            capture_output=True, text=True)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    rules = (directory / "dbdeck-alerts.yml").read_text()
    used = set(re.findall(r"\bdbdeck_[a-z_]+", rules)) - {"dbdeck_job"}  # the label, read as $labels.dbdeck_job
    assert used and used <= set(METRIC_HELP)  # every metric a rule reads is one dbdeck status exports
    assert "$labels.job" not in rules and "$labels.instance" not in rules  # Prometheus' own: the scrape job
