import sys

from dbdeck.cli import App
from dbdeck.hookspecs import hookimpl
from dbdeck.plugins.schedule.jobs import all_jobs, job_argv


class OffersJobs:
    @hookimpl
    def scheduled_jobs(self, config):
        return [{"name": "nightly-clone", "command": ["sandbox", "status"], "cron": "0 3 * * *"},
                {"name": "overridden", "command": ["x"], "every": "5m"}]


def app_with(tmp_path, body):
    path = tmp_path / "dbdeck.yaml"
    path.write_text(body)
    app = App()
    app.config_path = str(path)
    app.plugin_manager.register(OffersJobs())
    return app


def test_plugins_offer_default_jobs_and_config_overrides_them(tmp_path):
    app = app_with(tmp_path, "schedules:\n  overridden:\n    command: [y]\n    every: 10m\n")
    jobs = all_jobs(app)
    assert jobs["nightly-clone"].cron == "0 3 * * *"
    assert jobs["overridden"].command == ["y"] and jobs["overridden"].every == "10m"


def test_dbdeck_commands_run_through_this_interpreter(tmp_path):
    app = app_with(tmp_path, "")
    jobs = all_jobs(app)
    assert job_argv(app, jobs["nightly-clone"]) == [sys.executable, "-m", "dbdeck.launch", "sandbox", "status"]
    assert job_argv(app, jobs["overridden"]) == ["x"]
