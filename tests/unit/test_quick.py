"""dbdeck.quick: stamps answer a command line only while nothing that decides it changed, hold no
secret, and are ignored (never trusted) when anyone else could have written them."""

import json
import os

import pytest

from dbdeck import quick


@pytest.fixture
def cache(tmp_path, monkeypatch):
    directory = quick.cache_dir(tmp_path / "cache")
    monkeypatch.setattr(quick, "cache_dir", lambda root=None: directory)
    monkeypatch.setattr(quick, "_pending", None)
    return directory


def test_inputs_digest_follows_environment_and_files_but_not_per_run_variables(tmp_path):
    config = tmp_path / "dbdeck.yaml"
    config.write_text("sync_prod_to_dev: {}\n")
    files = {str(config): quick.file_digest(config)}
    base = quick.inputs_digest({"PATH": "/usr/bin", "DEV_DATABASE": "crm_dev"}, files)
    assert quick.inputs_digest({"PATH": "/usr/bin", "DEV_DATABASE": "crm_dev", "INVOCATION_ID": "1",
                                "JOURNAL_STREAM": "8:1"}, files) == base
    assert quick.inputs_digest({"PATH": "/usr/bin", "DEV_DATABASE": "other"}, files) != base
    assert quick.inputs_digest({"PATH": "/usr/bin", "DEV_DATABASE": "crm_dev", "EXCLUDE_TABLES": "x"}, files) != base
    config.write_text("sync_prod_to_dev: {anonymize: {users.email: null}}\n")
    assert quick.inputs_digest({"PATH": "/usr/bin", "DEV_DATABASE": "crm_dev"},
                               {str(config): quick.file_digest(config)}) != base


def test_cache_dir_is_refused_when_others_can_reach_it_or_it_is_a_symlink(tmp_path):
    good = quick.cache_dir(tmp_path / "good")
    assert good is not None and os.stat(good).st_mode & 0o777 == 0o700
    (tmp_path / "open" / "quick").mkdir(parents=True)
    os.chmod(tmp_path / "open" / "quick", 0o777)
    assert quick.cache_dir(tmp_path / "open") is None
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "quick").symlink_to(good)
    assert quick.cache_dir(tmp_path / "linked") is None


def offer_stamp(tmp_path, environ, handler="dbdeck.plugins.sync_prod_to_dev.quick:skip_line"):
    config = tmp_path / "dbdeck.yaml"
    config.write_text("x: 1\n")
    argv = ["dbdeck", "--config", str(config), "schedule", "exec", "job"]
    quick.begin(argv, environ, {str(config): quick.file_digest(config)})
    assert quick.offer(handler, "2026-12-02T10:00:00+0000")
    return argv, config


def test_a_stamp_answers_only_its_command_line_with_unchanged_inputs(cache, tmp_path, monkeypatch):
    argv, config = offer_stamp(tmp_path, dict(os.environ))
    assert quick.answer(argv).startswith("prod unchanged since the last sync at 2026-12-02T10:00:00")
    assert quick.answer([*argv, "--other"]) is None
    monkeypatch.setenv("DEV_DATABASE", "changed")
    assert quick.answer(argv) is None
    monkeypatch.delenv("DEV_DATABASE")
    config.write_text("x: 2\n")
    assert quick.answer(argv) is None


def test_stamps_others_could_have_written_and_foreign_handlers_are_ignored(cache, tmp_path):
    argv, _ = offer_stamp(tmp_path, dict(os.environ))
    path = quick.stamp_path(argv)
    os.chmod(path, 0o644)
    assert quick.answer(argv) is None
    os.chmod(path, 0o600)
    stamp = json.loads(path.read_text())
    stamp["handler"] = "os:system"
    path.write_text(json.dumps(stamp))
    assert quick.answer(argv) is None
    path.write_text("{not json")
    assert quick.answer(argv) is None
    if os.geteuid() == 0:
        path.write_text(json.dumps({**stamp, "handler": "dbdeck.plugins.sync_prod_to_dev.quick:skip_line"}))
        os.chown(path, 65534, 65534)
        assert quick.answer(argv) is None


def test_a_new_run_removes_the_stamp_until_it_offers_one(cache, tmp_path):
    argv, config = offer_stamp(tmp_path, dict(os.environ))
    quick.begin(argv, dict(os.environ), {str(config): quick.file_digest(config)})
    assert not quick.stamp_path(argv).exists() and quick.answer(argv) is None


def test_secrets_are_stored_by_origin_never_by_value(cache, tmp_path, monkeypatch):
    password_file = tmp_path / "pw"
    password_file.write_text("from-a-file\n")
    env_file = tmp_path / "app.env"
    env_file.write_text("DEV_DB_PASSWORD=from-an-env-file\n")
    monkeypatch.setattr(quick, "_pending", None)
    quick.begin(["dbdeck"], {"PROD_PASSWORD": "from-the-environment"}, {})
    cases = {"from-a-file": ["file", str(password_file)], "from-the-environment": ["env", "PROD_PASSWORD"],
             "from-an-env-file": ["env_file", str(env_file), "DEV_DB_PASSWORD"]}
    monkeypatch.setenv("PROD_PASSWORD", "from-the-environment")
    for value, origin in cases.items():
        portable = quick.portable_env({"PGPASSWORD": value, "PGHOST": "db"}, password_file, [str(env_file)])
        assert portable == {"env": {"PGHOST": "db"}, "secret_env": {"PGPASSWORD": origin}}
        assert value not in json.dumps(portable)
        assert quick.resolve_env(portable) == {"PGHOST": "db", "PGPASSWORD": value}
    assert quick.portable_env({"PGPASSWORD": "written-in-the-yaml"}, password_file, [str(env_file)]) is None
