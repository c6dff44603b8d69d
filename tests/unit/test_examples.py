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
