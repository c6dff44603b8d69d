from pathlib import Path

from dbdeck import config
from dbdeck.cli import App

ROOT = Path(__file__).resolve().parents[2]


def test_example_config_validates_with_every_plugin_section():
    app = App()
    app.config_path = str(ROOT / "etc" / "dbdeck.yaml")
    loaded = app.config
    assert loaded.endpoint_config("prod").role == "production"
    assert loaded.endpoint_config("dev").container == "crm-postgres-dev"


def test_example_config_honours_environment_defaults():
    loaded = config.load(str(ROOT / "etc" / "dbdeck.yaml"), environ={"DBDECK_RUN_DIR": "/tmp/x"})
    assert str(loaded.core.run_dir) == "/tmp/x"
    assert str(loaded.core.log_dir) == "/var/log/dbdeck"
