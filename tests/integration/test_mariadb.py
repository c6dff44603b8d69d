import pytest

from dbdeck.errors import CommandFailed, DbdeckError
from tests.conftest import endpoint

pytestmark = pytest.mark.integration


def test_driver_and_client_tool(mariadb_server):
    ep = mariadb_server.endpoint()
    assert "MariaDB" in ep.server_version()
    ep.execute("CREATE TABLE IF NOT EXISTS wpp_probe (id INT PRIMARY KEY, name VARCHAR(20))")
    ep.execute("REPLACE INTO wpp_probe VALUES (1, 'exatron')")
    assert ep.query("SELECT name FROM wpp_probe WHERE id = %s", (1,)) == [{"name": "exatron"}]
    result = ep.run_tool("mysql", "--batch", "--skip-column-names", "-e", "SELECT name FROM wpp_probe")
    assert result.stdout == "exatron\n"
    assert mariadb_server.password not in " ".join(result.argv)


def test_identity(mariadb_server):
    assert mariadb_server.endpoint().identity()[1] == "tenant"


def test_wrong_password(mariadb_server):
    ep = endpoint("tenant", mariadb_server.port, "wrong-maria-pw", "tenant", kind="mysql")
    with pytest.raises(DbdeckError) as err:
        ep.query("SELECT 1")
    assert "Access denied" in str(err.value) and "wrong-maria-pw" not in str(err.value)
    with pytest.raises(CommandFailed) as tool_err:
        ep.run_tool("mysql", "-e", "SELECT 1")
    assert "wrong-maria-pw" not in str(tool_err.value)


def test_unreachable_host_is_a_clear_error():
    ep = endpoint("down", 1, "x-pw", "tenant", kind="mysql")
    with pytest.raises(DbdeckError, match=r"cannot connect to down: mysql://dbdeck@127.0.0.1:1/tenant"):
        ep.query("SELECT 1")
