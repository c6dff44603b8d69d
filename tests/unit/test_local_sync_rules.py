from datetime import datetime, timezone

import pytest
from pydantic import ValidationError

from dbdeck.plugins.local_sync.engine import _older
from dbdeck.plugins.local_sync.model import LocalSync, TableMapping
from dbdeck.plugins.local_sync.source import setup_statements
from dbdeck.plugins.local_sync.target import quote


def settings(**kwargs):
    base = {"target_server": {"kind": "mysql", "host": "127.0.0.1"}, "instances": ["exatron"]}
    return LocalSync.model_validate({**base, **kwargs})


def test_builtin_tables_get_the_seeds_ddl_key_and_query():
    mapping = settings().tables[1]
    assert mapping.name == "wpp_contact_sectors"
    assert mapping.key == ["contact_id", "sector_id"]
    assert "PRIMARY KEY (contact_id, sector_id)" in mapping.ddl
    assert "%(instance)s" in mapping.source_query
    assert mapping.capture_deletes.source_table == "contact_sectors"


def test_a_builtin_entry_can_override_one_field_only():
    mapping = settings(tables=[{"name": "wpp_chats", "source_query": "SELECT 1 WHERE %(instance)s = ''"}]).tables[0]
    assert mapping.source_query.startswith("SELECT 1")
    assert mapping.key == ["id"] and mapping.watermark == "updated_at"


def test_a_custom_table_needs_a_query_and_a_key():
    with pytest.raises(ValidationError, match="give source_query"):
        TableMapping(name="custom")
    with pytest.raises(ValidationError, match="give key"):
        TableMapping(name="custom", source_query="SELECT 1")
    with pytest.raises(ValidationError, match="key column"):
        TableMapping(name="custom", source_query="SELECT 1", key=["id"], columns=["name"])


def test_labels_follow_the_language_and_the_seeds_summary_words():
    sectors = settings().tables[1]
    assert sectors.labels("pt") == ("setores de contatos", "setores")
    assert sectors.labels("en") == ("contact sectors", "sectors")
    assert TableMapping(name="notes", source_query="SELECT 1", key=["id"]).labels("pt") == ("notes", "notes")


@pytest.mark.parametrize("bad, message", [
    ({"instances": ["ok", "ok"]}, "listed twice"),
    ({"instances": ["bad name; DROP"]}, "instance name"),
    ({"database_pattern": "tenant"}, "must contain {instance}"),
    ({"target_server": None, "instances": ["a"]}, "give its target"),
    ({"target_server": None, "instances": [], "instances_query": "SELECT 'a'"}, "needs target_server"),
    ({"tables": ["wpp_chats", "wpp_chats"]}, "mapped twice"),
    ({"overlap_seconds": -1}, "greater than or equal to 0"),
])
def test_invalid_settings_say_what_is_wrong(bad, message):
    with pytest.raises(ValidationError, match=message):
        settings(**bad)


def test_a_watermark_older_than_the_capture_horizon_forces_a_full_sync():
    horizon = datetime(2026, 11, 17, tzinfo=timezone.utc)
    assert _older("2026-11-10T00:00:00+00:00", horizon, 0)
    assert not _older("2026-11-20T00:00:00+00:00", horizon, 300)
    assert _older("2026-11-17T00:04:00+00:00", horizon, 300)  # the overlap reaches before the horizon
    assert _older("not a timestamp", horizon, 0)


def test_mysql_identifiers_are_backtick_quoted():
    assert quote("wpp_contacts") == "`wpp_contacts`"
    assert quote("odd`name") == "`odd``name`"


def test_setup_captures_deletions_by_key_columns_and_notifies_for_every_source_table():
    import psycopg.sql

    text = " ".join(str(statement.as_string(None)) if isinstance(statement, psycopg.sql.Composable) else statement
                    for statement in setup_statements(settings().tables))
    assert "AFTER DELETE ON \"public\".\"contact_sectors\" REFERENCING OLD TABLE AS old_rows" in text
    assert "\"public\".dbdeck_local_sync_capture('contact_id', 'sector_id')" in text
    for table in ("contacts", "contact_sectors", "chats"):
        assert f'ON "public"."{table}" FOR EACH STATEMENT EXECUTE FUNCTION "public".dbdeck_local_sync_notify()' in text
    in_crm = " ".join(statement.as_string(None) for statement in setup_statements(settings().tables, "crm"))
    assert 'AFTER DELETE ON "crm"."contact_sectors"' in in_crm and 'INSERT INTO "crm"."dbdeck_local_sync_deletes"' in in_crm
    assert '"public"' not in in_crm
