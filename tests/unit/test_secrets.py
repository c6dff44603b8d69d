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
