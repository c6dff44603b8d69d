import pytest
from psycopg import sql

from dbdeck.errors import CommandFailed, DbdeckError
from tests.conftest import endpoint, wait_for

pytestmark = pytest.mark.integration


def test_connect_query_and_version(pg_server):
    ep = pg_server.endpoint()
    assert ep.query("SELECT 1 AS one") == [{"one": 1}]
    assert ep.server_version().split(".")[0].isdigit()
    ok, detail = ep.ping()
    assert ok and detail == ep.server_version()


def test_client_tools_get_the_password_from_the_environment(pg_server, tmp_path):
    ep = pg_server.endpoint()
    ep.execute("CREATE TABLE IF NOT EXISTS tool_check (id int PRIMARY KEY, note text)")
    ep.execute("INSERT INTO tool_check VALUES (1, 'dumped') ON CONFLICT DO NOTHING")
    result = ep.run_tool("psql", "-X", "-At", "-c", "SELECT note FROM tool_check WHERE id = 1")
    assert result.stdout == "dumped\n"
    assert pg_server.password not in " ".join(result.argv)
    dump = tmp_path / "dump.sql"
    with open(dump, "wb") as out:
        ep.run_tool("pg_dump", "--table=tool_check", stdout=out)
    assert "dumped" in dump.read_text() and "CREATE TABLE public.tool_check" in dump.read_text()


def test_wrong_password_is_a_clear_masked_error(pg_server):
    ep = endpoint("bad", pg_server.port, "definitely-wrong-pw", "postgres")
    with pytest.raises(DbdeckError) as err:
        ep.query("SELECT 1")
    assert "password authentication failed" in str(err.value)
    assert "definitely-wrong-pw" not in str(err.value)
    with pytest.raises(CommandFailed) as tool_err:
        ep.run_tool("psql", "-c", "SELECT 1")
    assert "definitely-wrong-pw" not in str(tool_err.value) and tool_err.value.returncode == 2


def test_identity_tells_same_database_from_another(pg_server):
    pg_server.endpoint().execute("CREATE DATABASE identity_other") if not pg_server.endpoint().query(
        "SELECT 1 AS x FROM pg_database WHERE datname = 'identity_other'") else None
    a = pg_server.endpoint("postgres")
    same = endpoint("alias", pg_server.port, pg_server.password, "postgres")
    other = pg_server.endpoint("identity_other")
    assert a.identity() == same.identity()
    assert a.identity() != other.identity()


def test_identifiers_with_quotes_are_quoted_not_concatenated(pg_server):
    ep = pg_server.endpoint()
    table = 'we"ird; DROP TABLE x; --'
    ep.execute(sql.SQL("CREATE TABLE {} (id int)").format(sql.Identifier(table)))
    rows = ep.query("SELECT count(*) AS n FROM pg_tables WHERE tablename = %s", (table,))
    assert rows == [{"n": 1}]


def test_streaming_pair(pg_pair):
    primary, standby = pg_pair
    p, s = primary.endpoint(), standby.endpoint()
    assert p.query("SELECT pg_is_in_recovery() AS r") == [{"r": False}]
    assert s.query("SELECT pg_is_in_recovery() AS r") == [{"r": True}]
    p.execute("CREATE TABLE IF NOT EXISTS pair_check (v text)")
    p.execute("INSERT INTO pair_check VALUES ('replicated')")
    assert wait_for(lambda: s.query("SELECT to_regclass('pair_check') IS NOT NULL AS t")[0]["t"]
                    and s.query("SELECT count(*) AS n FROM pair_check WHERE v = 'replicated'")[0]["n"] >= 1)
    slots = p.query("SELECT slot_name, active FROM pg_replication_slots")
    assert slots == [{"slot_name": "replica_slot", "active": True}]
    with pytest.raises(DbdeckError, match="read-only transaction"):
        s.execute("INSERT INTO pair_check VALUES ('nope')")
