import pytest
from pydantic import SecretStr

from dbdeck.config import EndpointConfig
from dbdeck.endpoints import Endpoint
from dbdeck.errors import DbdeckError
from dbdeck.run import Runner


def make(**kwargs):
    return Endpoint("ep", EndpointConfig(**kwargs), Runner())


def test_container_tool_forwards_variables_by_name_only():
    ep = make(container="crm-postgres", user="postgres", database="crm_production", password=SecretStr("cpw-123"))
    argv, env = ep.tool_invocation("pg_dump", "-Fc")
    assert argv == ["docker", "exec", "-i", "-e", "PGDATABASE", "-e", "PGPASSWORD", "-e", "PGUSER",
                    "crm-postgres", "pg_dump", "-Fc"]
    assert env == {"PGUSER": "postgres", "PGDATABASE": "crm_production", "PGPASSWORD": "cpw-123"}


def test_local_tool_uses_libpq_environment():
    ep = make(dsn=SecretStr("postgresql://app:dsn-pw@db.internal:6543/crm?sslmode=require"))
    argv, env = ep.tool_invocation("psql", "-c", "select 1")
    assert argv == ["psql", "-c", "select 1"]
    assert env == {"PGUSER": "app", "PGPASSWORD": "dsn-pw", "PGHOST": "db.internal", "PGPORT": "6543",
                   "PGDATABASE": "crm", "PGSSLMODE": "require"}
    assert "dsn-pw" not in " ".join(argv)


def test_tool_without_database_for_server_level_tools():
    _, env = make(host="h", database="d").tool_invocation("pg_basebackup", database=False)
    assert "PGDATABASE" not in env


def test_mysql_tool_arguments_and_password_env():
    ep = make(kind="mysql", host="127.0.0.1", port=3307, user="dbdeck", password=SecretStr("my-pw"),
              database="tenant")
    argv, env = ep.tool_invocation("mysql", "-e", "select 1")
    assert argv == ["mysql", "--host=127.0.0.1", "--protocol=TCP", "--port=3307", "--user=dbdeck",
                    "--database=tenant", "-e", "select 1"]
    assert env == {"MYSQL_PWD": "my-pw"}


def test_wrong_tool_for_kind():
    with pytest.raises(DbdeckError, match="not a MySQL/MariaDB client tool"):
        make(kind="mysql", host="h").tool_invocation("pg_dump")


def test_describe_masks_password():
    ep = make(dsn=SecretStr("postgresql://app:describe-pw@db/crm"), role="production")
    text = ep.describe()
    assert text == "ep: postgresql://app@db/crm [role production]" and "describe-pw" not in text


def test_describe_container():
    assert make(container="crm-postgres-dev", user="postgres", database="crm_development").describe() == \
        "ep: container crm-postgres-dev (postgres/crm_development)"


def test_mysql_url_is_parsed():
    ep = make(kind="mysql", dsn=SecretStr("mysql://u:p%40ss@host:3310/db"))
    _, env = ep.tool_invocation("mysql")
    assert env == {"MYSQL_PWD": "p@ss"}


def test_malformed_dsn_is_masked():
    with pytest.raises(DbdeckError) as err:
        make(dsn=SecretStr("host=x password=leaky-pw bogus"))
    assert "leaky-pw" not in str(err.value)


def test_connect_failure_message_has_no_password():
    ep = make(host="127.0.0.1", port=1, user="u", password=SecretStr("refused-pw"), connect_timeout=2)
    with pytest.raises(DbdeckError) as err:
        ep.connect()
    assert "cannot connect to ep: postgresql://u@127.0.0.1:1/" in str(err.value)
    assert "refused-pw" not in str(err.value)


def test_container_only_endpoint_has_no_driver_access():
    with pytest.raises(DbdeckError, match="reached only through docker exec"):
        make(container="crm-postgres").connect()


def test_dry_run_execute_prints_sql():
    lines = []
    ep = Endpoint("dev", EndpointConfig(host="h"), Runner(dry_run=True, echo=lines.append))
    ep.execute("DROP DATABASE x")
    assert lines == ["[dry-run] would execute on dev: DROP DATABASE x"]


def test_prisma_database_url_options_are_understood():
    from dbdeck.endpoints import _parse_libpq

    params = _parse_libpq("postgresql://app:p%40ss@db:5432/crm?schema=public&connection_limit=5&sslmode=require")
    assert params == {"user": "app", "password": "p@ss", "host": "db", "port": "5432", "dbname": "crm",
                      "sslmode": "require"}
    assert _parse_libpq("postgresql://app@db/crm?schema=tenant1")["options"] == "-c search_path=tenant1"


@pytest.mark.parametrize("name", ["crm_dev", "dbname=other application_name=", "host=evil.example port=1 x",
                                  "it's", "back\\slash", "Sales Dept"])
def test_a_database_name_given_to_a_client_tool_stays_one_name(name):
    """libpq expands a -d value containing '=' as a connection string; the quoted dbname keyword is
    parsed back to exactly the name (checked with libpq's own parser through psycopg)."""
    from psycopg.conninfo import conninfo_to_dict

    from dbdeck.endpoints import dbname_argument

    assert conninfo_to_dict(dbname_argument(name)) == {"dbname": name}


def test_hostile_endpoint_values_are_one_line_errors(tmp_path, caplog):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not a container or user name docker accepts"):
        EndpointConfig(container="--help")
    with pytest.raises(DbdeckError, match="the port is not a number"):
        make(kind="mysql", dsn=SecretStr("mysql://u:pw-x@host:notaport/db"))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValidationError, match="is empty"):
        EndpointConfig(password_file=empty)
    shared = tmp_path / "shared"
    shared.write_text("s3cret-shared\n")
    shared.chmod(0o644)
    EndpointConfig(password_file=shared)
    assert "can be read by others (mode 0o644); chmod 600 it" in caplog.text
