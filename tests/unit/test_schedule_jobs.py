import os
import sys

import pytest

from dbdeck.cli import App
from dbdeck.errors import ConfigError
from dbdeck.hookspecs import hookimpl
from dbdeck.plugins.schedule.jobs import all_jobs, job_argv


class OffersJobs:
    @hookimpl
    def scheduled_jobs(self, config):
        return [{"name": "nightly-clone", "command": ["sandbox", "status"], "cron": "0 3 * * *"},
                {"name": "overridden", "command": ["x"], "every": "5m"}]


@pytest.fixture(autouse=True)
def offers_jobs():
    """OffersJobs on the process-wide plugin manager for one test only (other tests must not see its jobs)."""
    from dbdeck.pluginmanager import shared_manager

    plugin = OffersJobs()
    shared_manager().register(plugin)
    yield
    shared_manager().unregister(plugin)


def app_with(tmp_path, body, path=None):
    path = path or tmp_path / "dbdeck.yaml"
    path.write_text(body)
    app = App()
    app.config_path = str(path)
    return app


def test_plugins_offer_default_jobs_and_config_overrides_them(tmp_path):
    app = app_with(tmp_path, "schedules:\n  overridden:\n    command: [y]\n    every: 10m\n")
    jobs = all_jobs(app)
    assert jobs["nightly-clone"].cron == "0 3 * * *"
    assert jobs["overridden"].command == ["y"] and jobs["overridden"].every == "10m"


def test_an_entry_without_command_changes_only_what_it_sets(tmp_path):
    app = app_with(tmp_path, "schedules:\n  nightly-clone:\n    every: 2h\n  overridden:\n    enabled: false\n")
    jobs = all_jobs(app)
    assert jobs["nightly-clone"].command == ["sandbox", "status"]
    assert (jobs["nightly-clone"].every, jobs["nightly-clone"].cron) == ("2h", None)
    assert jobs["overridden"].enabled is False and jobs["overridden"].every == "5m"


def test_an_entry_without_command_for_an_unknown_job_is_a_config_error(tmp_path):
    app = app_with(tmp_path, "schedules:\n  typo-job:\n    every: 2h\n")
    with pytest.raises(ConfigError, match="no plugin offers a job named 'typo-job'.*default jobs: "):
        all_jobs(app)


def test_seed_plugins_offer_their_jobs_only_once_configured(tmp_path, monkeypatch):
    for variable in ("PROD_DB_CONTAINER", "DATABASE_URL", "EXTERNAL_DB_URL", "SYNC_CRON_INTERVAL"):
        monkeypatch.delenv(variable, raising=False)
    jobs = all_jobs(app_with(tmp_path, "dbdeck: {}\n"))
    assert {n: j.enabled for n, j in jobs.items() if n in ("sync-prod-to-dev", "sync-databases", "local-sync")} == \
        {"sync-prod-to-dev": False, "sync-databases": False, "local-sync": False}
    monkeypatch.setenv("SYNC_CRON_INTERVAL", "10")
    jobs = all_jobs(app_with(tmp_path, "sync_prod_to_dev:\n  source: {container: a}\n  target: {container: b}\n"))
    assert jobs["sync-prod-to-dev"].enabled and jobs["sync-prod-to-dev"].cron == "*/10 * * * *"
    assert jobs["sync-databases"].command == ["sync-databases", "run"] and jobs["local-sync"].every == "6h"
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@h/db")
    assert all_jobs(app_with(tmp_path, "dbdeck: {}\n"))["sync-databases"].enabled


def test_dbdeck_commands_run_through_this_interpreter_with_the_config_pinned(tmp_path):
    app = app_with(tmp_path, "")
    jobs = all_jobs(app)
    config = str((tmp_path / "dbdeck.yaml").resolve())
    assert job_argv(app, jobs["nightly-clone"]) == [sys.executable, "-P", "-m", "dbdeck.launch", "dbdeck",
                                                    "--config", config, "sandbox", "status"]
    assert job_argv(app, jobs["overridden"]) == ["x"]


def test_relative_config_and_env_file_become_absolute(tmp_path, monkeypatch):
    (tmp_path / "etc").mkdir()
    monkeypatch.chdir(tmp_path)
    app = app_with(tmp_path, "schedules:\n  j:\n    command: [dbdeck, plugins]\n    every: 5m\n    env_file: job.env\n",
                   path=tmp_path / "etc" / "dbdeck.yaml")
    app.config_path = "etc/dbdeck.yaml"
    job = all_jobs(app)["j"]
    assert job.env_file == tmp_path.resolve() / "etc" / "job.env"
    assert job_argv(app, job)[5:7] == ["--config", str(tmp_path.resolve() / "etc" / "dbdeck.yaml")]


def test_no_config_file_is_pinned_as_no_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DBDECK_CONFIG", raising=False)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "dbdeck.yaml").write_text("dbdeck: {}\n")  # found by the search, ignored
    app = App()
    app.config_path = False  # --no-config
    assert app.config.path is None
    assert job_argv(app, all_jobs(app)["nightly-clone"])[5] == "--no-config"


def test_shell_overrides_are_listed_but_env_file_values_are_not(tmp_path, monkeypatch):
    (tmp_path / "seed.env").write_text("PROD_DB_USER=from_file\n")
    monkeypatch.setenv("PROD_DB_CONTAINER", "from-shell")
    monkeypatch.delenv("PROD_DB_USER", raising=False)
    app = app_with(tmp_path, "dbdeck:\n  env_files: [seed.env]\n")
    assert "PROD_DB_CONTAINER" in app.config.shell_overrides
    assert "PROD_DB_USER" not in app.config.shell_overrides and app.config.given("sync_prod_to_dev")
    assert os.environ.get("PROD_DB_USER") is None


def test_backup_jobs_are_offered_once_replication_backup_is_configured(tmp_path):
    pair = ("replication:\n  nodes:\n    a: {driver: local, data_dir: /tmp/a}\n"
            "    b: {driver: local, data_dir: /tmp/b}\n")
    jobs = all_jobs(app_with(tmp_path, pair))
    assert {name: jobs[name].enabled for name in ("pitr-maintain", "pitr-backup", "pitr-verify")} == {
        "pitr-maintain": False, "pitr-backup": False, "pitr-verify": False}
    jobs = all_jobs(app_with(tmp_path, pair + "  backup:\n    schedule: '15 2 * * *'\n"))
    assert jobs["pitr-backup"].enabled and jobs["pitr-backup"].cron == "15 2 * * *"
    assert jobs["pitr-backup"].command == ["pitr", "create"]
    assert jobs["pitr-maintain"].every == "1m" and jobs["pitr-verify"].cron == "30 4 * * 0"
