from pathlib import Path

import pytest

from dbdeck import config
from dbdeck.config import ConfigSection, Section
from dbdeck.errors import ConfigError


class SyncSection(Section):
    container: str = "crm-postgres"
    database: str = "crm_production"
    batch_size: int = 5000
    exclude_tables: list[str] = []


SYNC = ConfigSection("sync", SyncSection, env={"PROD_DB_CONTAINER": "container", "PROD_DATABASE": "database"})


def write(tmp_path, text, name="dbdeck.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def load(path, environ=None, sections=(SYNC,)):
    return config.load(str(path), sections, environ=environ or {})


def test_defaults_apply_when_section_missing(tmp_path):
    cfg = load(write(tmp_path, "dbdeck: {}\n"))
    assert cfg.section("sync").batch_size == 5000
    assert cfg.section("sync").container == "crm-postgres"


def test_a_section_left_to_its_defaults_is_built_only_when_read(tmp_path):
    class Unread(Section):
        level: int = 3

    spec = ConfigSection("unread", Unread)
    cfg = load(write(tmp_path, "sync: {batch_size: 7}\nunread: {}\n"), sections=(SYNC, spec))
    assert Unread.__pydantic_complete__ is False  # never validated, so its validator was never built
    assert cfg.section("sync").batch_size == 7
    assert cfg.section("unread").level == 3 and Unread.__pydantic_complete__ is True
    assert list(cfg.sections()) == ["dbdeck", "sync", "unread"]  # every section, in the declared order


def test_every_shipped_section_is_valid_with_its_defaults_alone(tmp_path):
    """What makes reading an untouched section later safe: its defaults alone never fail."""
    from dbdeck.pluginmanager import make_manager

    specs = [s for group in make_manager(load_entry_points=False).hook.config_section()
             for s in (group if isinstance(group, (list, tuple)) else [group])]
    assert len(specs) >= 8
    cfg = config.load(False, specs, environ={})
    assert set(cfg.sections()) >= {spec.name for spec in specs}
    for spec in specs:
        assert isinstance(cfg.section(spec.name), spec.model_class())


def test_search_order_explicit_then_env_then_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "etc").mkdir()
    cwd_file = write(tmp_path / "etc", "sync: {batch_size: 1}\n")
    env_file = write(tmp_path, "sync: {batch_size: 2}\n", "env.yaml")
    explicit = write(tmp_path, "sync: {batch_size: 3}\n", "explicit.yaml")
    assert config.find_config_file(None, {}) == Path("etc/dbdeck.yaml")
    assert config.find_config_file(None, {"DBDECK_CONFIG": str(env_file)}) == env_file
    assert config.find_config_file(str(explicit), {"DBDECK_CONFIG": str(env_file)}) == explicit
    assert config.load(None, (SYNC,), environ={}).section("sync").batch_size == 1
    assert cwd_file.exists()


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.find_config_file(str(tmp_path / "nope.yaml"), {})


def test_interpolation_with_default_and_escape(tmp_path):
    path = write(tmp_path, "sync:\n  container: ${CONTAINER}\n  database: ${DB:-fallback_db}\n"
                           "  exclude_tables: ['$${literal}']\n")
    cfg = load(path, {"CONTAINER": "my-pg"})
    assert cfg.section("sync").container == "my-pg"
    assert cfg.section("sync").database == "fallback_db"
    assert cfg.section("sync").exclude_tables == ["${literal}"]


def test_unset_variable_names_file_line_and_key(tmp_path):
    path = write(tmp_path, "sync:\n  container: ${NOT_SET_ANYWHERE}\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(err.value) == (f"{path}:2: sync.container: environment variable NOT_SET_ANYWHERE is not set "
                              "(write ${NOT_SET_ANYWHERE:-default} to give a default)")


def test_seed_environment_variables_override_yaml(tmp_path):
    path = write(tmp_path, "sync:\n  container: from-yaml\n  database: from_yaml\n")
    cfg = load(path, {"PROD_DB_CONTAINER": "from-env"})
    assert cfg.section("sync").container == "from-env"
    assert cfg.section("sync").database == "from_yaml"


def test_malformed_yaml_is_one_line_with_position(tmp_path):
    path = write(tmp_path, "sync:\n  container: [unclosed\n  database: x\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    message = str(err.value)
    assert message.startswith(f"{path}:") and "malformed YAML" in message
    assert "\n" not in message


def test_unknown_key_names_line_and_expected_keys(tmp_path):
    path = write(tmp_path, "sync:\n  container: x\n  batchsize: 10\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(err.value).startswith(f"{path}:3: sync.batchsize: unknown key (expected one of: batch_size,")


def test_unknown_section(tmp_path):
    path = write(tmp_path, "dbdeck: {}\nsyncc: {}\n")
    with pytest.raises(ConfigError, match=r":2: unknown section 'syncc' \(expected one of: dbdeck, endpoints, sync\)"):
        load(path)


def test_wrong_type_says_what_was_expected(tmp_path):
    path = write(tmp_path, "sync:\n  batch_size: lots\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(err.value) == f"{path}:2: sync.batch_size: Input should be a valid integer, unable to parse " \
                             f"string as an integer, got 'lots'"


def test_section_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="sync: expected a mapping of settings, got a list"):
        load(write(tmp_path, "sync: [1, 2]\n"))


def test_password_file_is_read_and_never_printed(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("s3cr3t-from-file\n")
    path = write(tmp_path, f"endpoints:\n  dev:\n    host: 127.0.0.1\n    password_file: {secret}\n")
    cfg = load(path)
    endpoint = cfg.endpoint_config("dev")
    assert endpoint.password.get_secret_value() == "s3cr3t-from-file"
    assert "s3cr3t" not in repr(endpoint) and "s3cr3t" not in str(config.dump(cfg))


def test_unreadable_password_file(tmp_path):
    path = write(tmp_path, f"endpoints:\n  dev:\n    host: h\n    password_file: {tmp_path}/missing\n")
    with pytest.raises(ConfigError, match=r":4: endpoints.dev.password_file: cannot read password file .*missing: No such file"):
        load(path)


def test_wrong_secret_value_is_not_echoed(tmp_path):
    path = write(tmp_path, "endpoints:\n  dev:\n    password: [not, a, string]\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    assert "not" not in str(err.value).split("password:")[-1]


def test_endpoint_rejects_dsn_and_host_together(tmp_path):
    path = write(tmp_path, "endpoints:\n  x:\n    dsn: postgresql://u:p@h/db\n    host: h\n")
    with pytest.raises(ConfigError, match="give either dsn or host/port, not both"):
        load(path)


def test_env_files_fill_missing_variables_only(tmp_path):
    (tmp_path / ".env.sync").write_text("EXTERNAL_DB_URL=postgresql://u:pw@neon/db\nCONTAINER=from-file\n")
    path = write(tmp_path, "dbdeck:\n  env_files: [.env.sync]\nsync:\n  container: ${CONTAINER}\n"
                           "endpoints:\n  external:\n    dsn: ${EXTERNAL_DB_URL}\n")
    cfg = load(path, {"CONTAINER": "from-environment"})
    assert cfg.section("sync").container == "from-environment"
    assert cfg.endpoint_config("external").dsn.get_secret_value() == "postgresql://u:pw@neon/db"


def test_unknown_endpoint_name(tmp_path):
    cfg = load(write(tmp_path, "endpoints:\n  prod: {host: h}\n"))
    with pytest.raises(ConfigError, match=r"no endpoint named 'dev' .*known: prod"):
        cfg.endpoint_config("dev")


def test_empty_file_means_defaults(tmp_path):
    assert load(write(tmp_path, "")).section("sync").database == "crm_production"


def test_a_seed_variable_overrides_one_field_of_an_endpoint_never_the_whole_endpoint(tmp_path):
    from dbdeck.plugins.sync_prod_to_dev import SEED_ENVIRONMENT
    from dbdeck.plugins.sync_prod_to_dev.model import SyncProdToDev

    spec = ConfigSection("sync_prod_to_dev", SyncProdToDev, env=SEED_ENVIRONMENT)
    path = write(tmp_path, "endpoints:\n  prod: {host: db.internal, port: 5433, user: app, database: crm,"
                           " role: production}\nsync_prod_to_dev:\n  source: prod\n")
    section = load(path, {"PROD_DB_CONTAINER": "crm-postgres-2"}, sections=(spec,)).section("sync_prod_to_dev")
    source = section.source
    assert (source.container, source.host, source.port, source.user, source.database, source.role) == \
        ("crm-postgres-2", "db.internal", 5433, "app", "crm", "production")
    # an unset target keeps the section's default endpoint: DEV_DATABASE changes only the database
    target = load(path, {"DEV_DATABASE": "crm_dev_2"}, sections=(spec,)).section("sync_prod_to_dev").target
    assert (target.database, target.container, target.user, target.role) == \
        ("crm_dev_2", "crm-postgres-dev", "postgres", "development")
    assert load(path, {"DEV_DATABASE": "crm_dev_2"}, sections=(spec,)).endpoints["prod"].container is None


def test_yaml_that_a_config_never_means_is_refused_in_one_line(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))
    with pytest.raises(ConfigError, match="more than 20000 values through its aliases"):
        load(write(tmp_path, bomb))
    with pytest.raises(ConfigError, match=r"dbdeck.yaml:3: key 'container' is given twice .*first on line 2"):
        load(write(tmp_path, "sync:\n  container: a\n  container: b\n"))
    # anchors and merge keys a person writes still work
    cfg = load(write(tmp_path, "x: &base {container: c1, database: d1}\nsync:\n  <<: *base\n  database: d2\n"),
               sections=(SYNC, ConfigSection("x", SyncSection)))
    assert (cfg.section("sync").container, cfg.section("sync").database) == ("c1", "d2")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(_latin1(tmp_path))


def _latin1(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("sync: {container: caf\xe9}\n".encode("latin-1"))
    return path


def test_nested_default_interpolation_and_unreadable_placeholders(tmp_path):
    path = write(tmp_path, "sync:\n  container: ${A:-${B:-fallback}}\n  database: ${A:-${C}}\n")
    assert load(path, {"C": "from_c"}).section("sync").container == "fallback"
    assert load(path, {"C": "from_c"}).section("sync").database == "from_c"
    assert load(path, {"A": "a", "C": "c"}).section("sync").database == "a"
    with pytest.raises(ConfigError, match=r"dbdeck.yaml:2: sync.container: cannot read the \$\{...\}"):
        load(write(tmp_path, "sync:\n  container: ${A:-${B:-${C}}}\n"), {"C": "x"})


def test_a_relative_password_file_is_relative_to_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "pw").write_text("s3cret\n")
    path = write(tmp_path / "conf", "endpoints:\n  db: {host: h, password_file: pw}\n")
    monkeypatch.chdir("/")
    cfg = config.load(str(path), (), environ={})
    assert cfg.endpoints["db"].password.get_secret_value() == "s3cret"
    assert cfg.endpoints["db"].password_file == tmp_path / "conf" / "pw"


def test_every_problem_in_every_section_is_reported_once_each_in_file_order(tmp_path):
    path = write(tmp_path, "endpoints:\n  prod: {port: notaport}\n  dev: [x]\nsync:\n  batch_size: lots\n"
                           "dbdeck:\n  run_dir: [1]\n")
    with pytest.raises(ConfigError) as raised:
        load(path)
    lines = str(raised.value).splitlines()
    assert [line.split(":")[1] for line in lines] == ["2", "3", "5", "7"], lines
    assert "endpoints.prod.port" in lines[0] and "endpoints.dev" in lines[1] and "sync.batch_size" in lines[2]
