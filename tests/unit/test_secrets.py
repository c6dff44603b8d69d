from dbdeck import secrets


def test_registered_secret_is_masked_anywhere():
    secrets.register("hunter2-registered")
    assert secrets.mask("login failed for hunter2-registered!") == "login failed for ***!"


def test_url_password_masked_by_shape():
    assert secrets.mask("postgresql://app:pa55w0rd@db:5432/x") == "postgresql://app:***@db:5432/x"


def test_key_value_passwords_masked():
    text = "host=db password='a b c' user=x PGPASSWORD=zz MYSQL_PWD=qq"
    masked = secrets.mask(text)
    assert "a b c" not in masked and "zz" not in masked and "qq" not in masked
    assert "host=db" in masked and "user=x" in masked


def test_short_values_are_not_registered():
    secrets.register("ab")
    assert secrets.mask("abba") == "abba"


def test_secretstr_values_can_be_registered():
    from pydantic import SecretStr

    secrets.register(SecretStr("from-secretstr-value"))
    assert "from-secretstr-value" not in secrets.mask("x from-secretstr-value y")


def test_only_secret_named_variables_are_treated_as_secrets():
    from dbdeck.run import Runner, printable

    Runner().run(["true"], env={"PGUSER": "plainuser-name", "PGPASSWORD": "named-secret-pw"})
    assert secrets.mask("plainuser-name named-secret-pw") == "plainuser-name ***"
    assert printable(["x"], {"PGHOST": "db", "MYSQL_PWD": "v"}) == "MYSQL_PWD=*** PGHOST=db x"


def test_mask_values_keeps_json_valid_when_a_message_says_password():
    import json

    message = "(1045, \"Access denied for user 'x' (using password: YES)\")"
    masked = secrets.mask_values({"error": message, "nested": [("password=abc123",)], "n": 3})
    text = json.dumps(masked)
    assert json.loads(text)["error"].startswith("(1045, \"Access denied")
    assert masked["nested"] == [["password=***"]] and masked["n"] == 3


def test_a_weak_word_password_is_masked_as_a_word_only():
    secrets.register("postgres")
    shown = secrets.mask("connect postgresql://postgres@db:5432/app as postgres failed (PGPASSWORD=postgres)")
    assert shown == "connect postgresql://***@db:5432/app as *** failed (PGPASSWORD=***)"


def test_mysql_access_denied_message_is_left_whole():
    message = "(1045, \"Access denied for user 'dbdeck'@'localhost' (using password: YES)\")"
    assert secrets.mask(message) == message
    assert secrets.mask("password: hunter2 rest") == "password: *** rest"


def test_webhook_url_is_a_secret_everywhere(tmp_path):
    from dbdeck import config as config_module
    from dbdeck.plugins.notify.model import Notify

    def load(path):
        return config_module.load(str(path), [config_module.ConfigSection("notify", Notify)], environ={})

    url = "https://hooks.example.com/services/T00/B00/tokentokentoken"
    path = tmp_path / "c.yaml"
    path.write_text(f"notify:\n  webhook_url: {url}\n")
    loaded = load(path)
    settings = loaded.section("notify")
    assert settings.webhook_url.get_secret_value() == url
    assert "tokentoken" not in str(config_module.dump(loaded))
    assert secrets.mask(f"POST {url} failed") == "POST *** failed"
    assert settings.webhook_shown() == "https://hooks.example.com/***"
    path.write_text("notify:\n  webhook_url: ftp://files.example.com/secret-path-token\n")
    try:
        load(path)
    except config_module.ConfigError as exc:
        assert "secret-path-token" not in str(exc) and "http(s) URL" in str(exc)
    else:
        raise AssertionError("ftp:// accepted")
