"""local-sync against a real PostgreSQL main database and a real MariaDB with per-tenant databases."""

import json
import os
import signal
import subprocess
import textwrap
from pathlib import Path

import psycopg
import pymysql
import pytest

from dbdeck.plugins.local_sync.tables import BUILTIN_TABLES
from tests.conftest import BIN, wait_for

pytestmark = pytest.mark.integration

SAMPLE = Path(__file__).resolve().parents[2] / "plugins" / "sandbox" / "sample_prod.sql"
TRICKY = ["plain", "quote ' and \"double\"", "comma, here", "line\nbreak", "back\\slash \\N", "NULL", "",
          "tab\there", "form\ffeed", "emoji 🎉 ção", "crlf\r\nend"]


class World:
    """A main database `crm_lsN` on the session's PostgreSQL, tenants `lsN_<instance>` on its MariaDB."""

    counter = 0

    def __init__(self, pg_server, mariadb_server, tmp_path, instances=("exatron", "acme"), schema=None):
        World.counter += 1
        self.schema = schema  # Prisma's ?schema=: the app's tables live there, not in public
        self.n = World.counter
        self.pg_server, self.maria = pg_server, mariadb_server
        self.database = f"crm_ls{self.n}"
        self.instances = list(instances)
        self.tmp_path = tmp_path
        with psycopg.connect(**self.pg_args("postgres"), autocommit=True) as c:
            c.execute(f"CREATE DATABASE {self.database}")
        with psycopg.connect(**self.pg_args(), autocommit=True) as c:
            if schema:
                c.execute(f"CREATE SCHEMA {schema}")
            c.execute(SAMPLE.read_text())  # its rows were last written a day ago: incremental runs see only ours
        for instance in self.instances:
            self.mysql(f"CREATE DATABASE {self.tenant_db(instance)}", database=None)
        for name, password in (("pg.pw", pg_server.password), ("maria.pw", mariadb_server.password)):
            (tmp_path / name).write_text(password)
            os.chmod(tmp_path / name, 0o600)
        self.config = tmp_path / "dbdeck.yaml"
        self.write_config()

    def pg_args(self, database=None):
        args = {"host": "127.0.0.1", "port": self.pg_server.port, "user": "postgres",
                "password": self.pg_server.password, "dbname": database or self.database}
        if self.schema and not database:
            args["options"] = f"-c search_path={self.schema}"
        return args

    def tenant_db(self, instance):
        return f"ls{self.n}_{instance}"

    def write_config(self, extra="", instances=None, overlap_seconds=5):
        listed = "\n".join(f"    - {name}" for name in (instances or self.instances))
        main = (f"{{host: 127.0.0.1, port: {self.pg_server.port}, user: postgres, password_file: {self.tmp_path}/pg.pw,"
                f" database: {self.database}}}")
        if self.schema:  # the way a Prisma app's .env names it
            main = (f"{{dsn: 'postgresql://postgres@127.0.0.1:{self.pg_server.port}/{self.database}?schema={self.schema}',"
                    f" password_file: {self.tmp_path}/pg.pw}}")
        self.config.write_text(f"""dbdeck:
  state_dir: {self.tmp_path}/state
  run_dir: {self.tmp_path}/run
endpoints:
  main: {main}
  tenants: {{kind: mysql, host: 127.0.0.1, port: {self.maria.port}, user: dbdeck,
            password_file: {self.tmp_path}/maria.pw}}
local_sync:
  source: main
  target_server: tenants
  database_pattern: "ls{self.n}_{{instance}}"
  overlap_seconds: {overlap_seconds}
  instances:
{listed}
{extra}""")

    def run(self, *args, env=None, timeout=120):
        return subprocess.run([str(BIN / "local-sync"), "--config", str(self.config), *args], capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, **(env or {})})

    def sync(self, *args):
        done = self.run("--format", "json", *args)
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout)

    def pg(self, statement, params=None):
        with psycopg.connect(**self.pg_args(), autocommit=True) as c:
            cursor = c.execute(statement, params)
            return cursor.fetchall() if cursor.description else None

    def mysql(self, statement, params=None, database="", instance=None):
        database = self.tenant_db(instance) if instance else (database or None)
        connection = pymysql.connect(host="127.0.0.1", port=self.maria.port, user="dbdeck",
                                     password=self.maria.password, database=database, autocommit=True,
                                     charset="utf8mb4")
        try:
            with connection.cursor() as cursor:
                cursor.execute(statement, params)
                return cursor.fetchall()
        finally:
            connection.close()

    def expected(self, table, instance):
        """The source query's rows for an instance, normalised as MySQL stores them."""
        spec = BUILTIN_TABLES[table]
        columns = ", ".join(f"q.{c}" for c in spec["columns"])
        rows = self.pg(f"SELECT {columns} FROM ({spec['source_query']}) q", {"instance": instance})
        return sorted(tuple(_normal(v) for v in row) for row in rows)

    def actual(self, table, instance):
        columns = ", ".join(BUILTIN_TABLES[table]["columns"])
        return sorted(tuple(_normal(v) for v in row) for row in self.mysql(f"SELECT {columns} FROM {table}",
                                                                               instance=instance))

    def assert_equal(self):
        for instance in self.instances:
            for table in BUILTIN_TABLES:
                expected, actual = self.expected(table, instance), self.actual(table, instance)
                assert expected, f"no source rows for {instance}.{table}: the test data is wrong"
                assert actual == expected, f"{instance}.{table} differs from the source"


def _normal(value):
    if isinstance(value, bool):
        return int(value)
    if hasattr(value, "tzinfo") and value.tzinfo is not None:
        value = value.astimezone(__import__("datetime").timezone.utc).replace(tzinfo=None)
    if hasattr(value, "microsecond"):
        value = value.replace(microsecond=0)  # DATETIME keeps whole seconds
    return value


@pytest.fixture
def world(pg_server, mariadb_server, tmp_path):
    return World(pg_server, mariadb_server, tmp_path)


def test_first_sync_is_full_and_equals_the_source_with_the_seeds_log_lines(world):
    done = world.run()
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for line in ("[LocalSync] ====== Iniciando sincronização para: exatron ======",
                 "[LocalSync] Verificando tabelas no banco do tenant: exatron",
                 "[LocalSync] Tabela wpp_contacts verificada/criada",
                 "[LocalSync] Tabela wpp_contact_sectors verificada/criada",
                 "[LocalSync] Tabela wpp_chats verificada/criada",
                 "[LocalSync] Sincronizando contatos para: exatron",
                 "[LocalSync] 1000 contatos sincronizados",
                 "[LocalSync] Sincronizando setores de contatos para: exatron",
                 "[LocalSync] Sincronizando chats para: exatron",
                 "[LocalSync] ====== Sincronização concluída para: exatron ======"):
        assert line in out.splitlines(), f"{line!r} missing:\n{out}"
    exatron_sectors = len(world.expected("wpp_contact_sectors", "exatron"))
    exatron_chats = len(world.expected("wpp_chats", "exatron"))
    assert f"[LocalSync] Resumo: 1000 contatos, {exatron_sectors} setores, {exatron_chats} chats" in out
    world.assert_equal()
    # the seed's DDL exactly: keys as the seed declares them
    create = world.mysql("SHOW CREATE TABLE wpp_contacts", instance="acme")[0][1]
    assert "UNIQUE KEY `unique_instance_phone` (`instance`,`phone`)" in create
    assert "PRIMARY KEY (`id`)" in create
    # soft-deleted contacts are there with is_deleted = 1
    assert world.mysql("SELECT COUNT(*) FROM wpp_contacts WHERE is_deleted = 1", instance="exatron")[0][0] > 0


def test_incremental_picks_up_inserts_updates_soft_deletes_and_sector_removals(world):
    assert world.run("setup").returncode == 0
    first = world.sync()
    assert {t["mode"] for o in first["instances"] for t in o["tables"].values()} == {"full"}
    contact = world.pg("SELECT id FROM contacts WHERE instance = 'exatron' AND deleted_at IS NULL "
                       "AND id IN (SELECT contact_id FROM contact_sectors) ORDER BY id LIMIT 1")[0][0]
    sector = world.pg("SELECT sector_id FROM contact_sectors WHERE contact_id = %s LIMIT 1", (contact,))[0][0]
    new_id = world.pg("INSERT INTO contacts (instance, name, phone) VALUES ('exatron', 'Nova', '5599') "
                      "RETURNING id")[0][0]
    world.pg("INSERT INTO contact_sectors (contact_id, sector_id) SELECT %s, min(id) FROM sectors "
             "WHERE instance = 'exatron'", (new_id,))
    world.pg("UPDATE contacts SET name = 'Renomeado', updated_at = now() WHERE id = %s", (contact,))
    world.pg("UPDATE contacts SET deleted_at = now(), updated_at = now() WHERE id = %s", (contact + 1,))
    world.pg("DELETE FROM contact_sectors WHERE contact_id = %s AND sector_id = %s", (contact, sector))
    world.pg("UPDATE chats SET is_finished = true, finished_at = now(), updated_at = now() "
             "WHERE id = (SELECT min(id) FROM chats WHERE instance = 'exatron' AND NOT is_finished)")
    second = world.sync()
    exatron = next(o for o in second["instances"] if o["instance"] == "exatron")
    tables = exatron["tables"]
    assert {t["mode"] for t in tables.values()} == {"incremental"}
    assert tables["wpp_contacts"]["rows"] == 3          # new, renamed, soft-deleted: nothing else re-read
    assert tables["wpp_contact_sectors"]["rows"] == 1 and tables["wpp_contact_sectors"]["removed"] == 1
    assert tables["wpp_chats"]["rows"] == 1
    acme = next(o for o in second["instances"] if o["instance"] == "acme")
    assert all(t["rows"] == 0 and t["removed"] == 0 for t in acme["tables"].values())
    world.assert_equal()
    assert world.mysql("SELECT is_deleted FROM wpp_contacts WHERE id = %s", (contact + 1,),
                       instance="exatron") == ((1,),)
    # a rerun is idempotent: it re-reads the overlap window's rows, but writes and removes nothing
    third = world.run()
    assert third.returncode == 0 and "[LocalSync] 0 contatos sincronizados" in third.stdout, third.stdout
    again = world.sync()
    again = next(o for o in again["instances"] if o["instance"] == "exatron")["tables"]
    assert all(again[name]["rows"] == 0 and again[name]["removed"] == 0 for name in tables), again
    world.assert_equal()


def test_hard_deletes_reach_the_tenants_in_incremental_runs_and_every_mode_reports_removals(world):
    assert world.run("setup").returncode == 0
    world.sync()
    contacts = [r[0] for r in world.pg("SELECT id FROM contacts WHERE instance = 'exatron' ORDER BY id LIMIT 3")]
    world.pg("DELETE FROM chats WHERE contact_id = ANY(%s)", (contacts,))
    world.pg("DELETE FROM contact_sectors WHERE contact_id = ANY(%s)", (contacts,))
    world.pg("DELETE FROM contacts WHERE id = ANY(%s)", (contacts,))
    preview = world.run("--dry-run", "--instance", "exatron")
    assert preview.returncode == 0 and "%s" not in preview.stdout, preview.stdout
    assert f"DELETE FROM `wpp_contacts` WHERE (`id` = {contacts[0]})" in preview.stdout, preview.stdout
    result = world.sync()
    exatron = next(o for o in result["instances"] if o["instance"] == "exatron")["tables"]
    assert {t["mode"] for t in exatron.values()} == {"incremental"}
    assert exatron["wpp_contacts"]["removed"] == 3 and exatron["wpp_chats"]["removed"] > 0
    world.assert_equal()
    # a full load that swaps tables reports what it removed too
    world.mysql("INSERT INTO wpp_contacts VALUES (999999, 'exatron', 'stray', 'x', NULL, 0)", instance="exatron")
    full = world.sync("--full", "--instance", "exatron")
    contacts_table = full["instances"][0]["tables"]["wpp_contacts"]
    assert contacts_table["method"] == "swap" and contacts_table["removed"] == 1
    world.assert_equal()


def test_a_prisma_url_with_another_schema_is_used_everywhere(pg_server, mariadb_server, tmp_path):
    world = World(pg_server, mariadb_server, tmp_path, schema="crm")
    setup = world.run("setup")
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert world.pg("SELECT to_regclass('crm.dbdeck_local_sync_deletes') IS NOT NULL")[0][0]
    world.sync()
    world.assert_equal()
    contact = world.pg("SELECT id FROM contacts WHERE instance = 'acme' ORDER BY id LIMIT 1")[0][0]
    world.pg("DELETE FROM chats WHERE contact_id = %s", (contact,))
    world.pg("DELETE FROM contact_sectors WHERE contact_id = %s", (contact,))
    # the application's own session may use another search_path: the capture trigger still works
    with psycopg.connect(**{**world.pg_args(), "options": "-c search_path=public"}, autocommit=True) as c:
        c.execute("DELETE FROM crm.contacts WHERE id = %s", (contact,))
    result = world.sync()
    acme = next(o for o in result["instances"] if o["instance"] == "acme")["tables"]
    assert acme["wpp_contacts"]["removed"] == 1 and acme["wpp_contacts"]["mode"] == "incremental"
    world.assert_equal()


def test_sector_removal_without_setup_needs_a_full_sync(world):
    world.sync()
    contact, sector = world.pg("SELECT contact_id, sector_id FROM contact_sectors cs JOIN contacts c "
                               "ON c.id = cs.contact_id WHERE c.instance = 'acme' LIMIT 1")[0]
    world.pg("DELETE FROM contact_sectors WHERE contact_id = %s AND sector_id = %s", (contact, sector))
    done = world.run()
    assert done.returncode == 0
    assert "local-sync setup" in done.stdout  # says why the removal is not seen
    assert world.mysql("SELECT COUNT(*) FROM wpp_contact_sectors WHERE contact_id = %s AND sector_id = %s",
                       (contact, sector), instance="acme")[0][0] == 1
    full = world.sync("--full")
    assert {t["mode"] for o in full["instances"] for t in o["tables"].values()} == {"full"}
    world.assert_equal()


def test_full_resync_leaves_the_tables_equal_even_after_hard_deletes_and_tenant_edits(world):
    world.sync()
    world.pg("DELETE FROM chats WHERE contact_id IN (SELECT id FROM contacts WHERE instance = 'acme' "
             "ORDER BY id LIMIT 5)")
    world.pg("DELETE FROM contacts WHERE id IN (SELECT id FROM contacts WHERE instance = 'acme' ORDER BY id LIMIT 5)")
    world.mysql("INSERT INTO wpp_contacts VALUES (999999, 'acme', 'stray', 'x', NULL, 0)", instance="acme")
    world.mysql("UPDATE wpp_chats SET type = 'edited locally'", instance="acme")
    world.sync("--full", "--instance", "acme")
    world.assert_equal()
    leftovers = world.mysql("SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s AND "
                            "TABLE_NAME LIKE '%%dbdeck\\_%%'", (world.tenant_db("acme"),), database=None)
    assert sorted(r[0] for r in leftovers) == ["dbdeck_local_sync_state"]


def test_a_table_with_a_trigger_is_merged_not_swapped_and_keeps_its_trigger(world):
    world.sync()
    world.mysql("CREATE TABLE audit (n INT)", instance="exatron")
    world.mysql("CREATE TRIGGER wpp_chats_audit AFTER INSERT ON wpp_chats FOR EACH ROW INSERT INTO audit VALUES (1)",
                instance="exatron")
    world.pg("DELETE FROM chats WHERE id = (SELECT min(id) FROM chats WHERE instance = 'exatron')")
    world.pg("INSERT INTO chats (instance, type, contact_id) SELECT 'exatron', 'individual', min(id) FROM contacts "
             "WHERE instance = 'exatron'")
    result = world.sync("--full", "--instance", "exatron")
    assert result["instances"][0]["tables"]["wpp_chats"]["removed"] == 1
    assert result["instances"][0]["tables"]["wpp_chats"]["method"] == "merge"
    assert result["instances"][0]["tables"]["wpp_contacts"]["method"] == "swap"
    world.assert_equal()
    assert world.mysql("SELECT COUNT(*) FROM audit", instance="exatron")[0][0] == 1
    assert world.mysql("SHOW TRIGGERS", instance="exatron")


def test_a_column_the_tenant_added_survives_a_full_sync(world):
    world.sync("--instance", "acme")
    world.mysql("ALTER TABLE wpp_contacts ADD COLUMN local_note VARCHAR(50) NULL", instance="acme")
    world.mysql("UPDATE wpp_contacts SET local_note = 'kept' WHERE id = (SELECT * FROM (SELECT MIN(id) "
                "FROM wpp_contacts) AS m)", instance="acme")
    world.sync("--instance", "acme", "--full")
    assert world.mysql("SELECT COUNT(*) FROM wpp_contacts WHERE local_note = 'kept'", instance="acme")[0][0] == 1
    world.instances = ["acme"]
    world.assert_equal()


def test_a_transaction_committing_after_the_run_read_past_it_is_not_lost(world):
    world.write_config(overlap_seconds=0)  # only the oldest-writer guard protects this row
    world.sync()
    late = psycopg.connect(**world.pg_args())
    try:
        late.execute("UPDATE contacts SET name = 'late writer', updated_at = now() "
                     "WHERE id = (SELECT min(id) FROM contacts WHERE instance = 'exatron')")
        world.sync("--instance", "exatron")  # runs while the writer is open: cannot see its row
        late.commit()
    finally:
        late.close()
    world.sync("--instance", "exatron")
    assert world.mysql("SELECT COUNT(*) FROM wpp_contacts WHERE name = 'late writer'", instance="exatron")[0][0] == 1


def test_a_phone_moved_to_another_contact_does_not_fail_the_batch(world):
    world.sync()
    a, b = [r[0] for r in world.pg("SELECT id FROM contacts WHERE instance = 'exatron' ORDER BY id LIMIT 2")]
    phone_a = world.pg("SELECT phone FROM contacts WHERE id = %s", (a,))[0][0]
    world.pg("UPDATE contacts SET phone = 'tmp', updated_at = now() WHERE id = %s", (a,))
    world.pg("UPDATE contacts SET phone = %s, updated_at = now() WHERE id = %s", (phone_a, b))
    world.sync("--instance", "exatron")
    world.assert_equal()


def test_one_tenant_down_or_refusing_the_password_does_not_stop_the_others(world, tmp_path):
    world.write_config(f"""    - name: broken
      target: {{kind: mysql, host: 127.0.0.1, port: {world.maria.port}, user: dbdeck,
               password: "wrong-tenant-pw", database: nowhere}}
    - name: down
      target: {{kind: mysql, host: 127.0.0.1, port: 1, user: dbdeck, password_file: {tmp_path}/maria.pw,
               database: nowhere}}
""")
    done = world.run("--format", "json")
    assert done.returncode == 1
    result = json.loads(done.stdout)
    assert sorted(result["failed"]) == ["broken", "down"]
    assert {o["instance"]: o["status"] for o in result["instances"]}["exatron"] == "ok"
    assert "Falha em 2 de 4 instância(s)" in done.stderr
    assert "wrong-tenant-pw" not in done.stdout + done.stderr and world.maria.password not in done.stderr
    assert "(using password: YES)" in done.stdout + done.stderr  # the driver's message whole, only secrets masked
    world.assert_equal()


def test_dry_run_changes_nothing(world):
    done = world.run("--dry-run")
    assert done.returncode == 0, done.stderr
    assert "would execute on exatron: CREATE TABLE wpp_contacts" in done.stdout
    assert "would load 1000 row(s)" in done.stdout
    for instance in world.instances:
        assert world.mysql("SHOW TABLES", instance=instance) == ()
    setup = world.run("setup", "--dry-run")
    assert "CREATE TRIGGER dbdeck_local_sync_capture" in setup.stdout
    assert world.pg("SELECT to_regclass('dbdeck_local_sync_deletes')") == [(None,)]


def test_an_instance_is_never_written_into_another_instances_database(world):
    world.sync("--instance", "exatron")
    world.write_config(f"""    - name: intruder
      target: {{kind: mysql, host: 127.0.0.1, port: {world.maria.port}, user: dbdeck,
               password_file: {world.tmp_path}/maria.pw, database: {world.tenant_db('exatron')}}}
""", instances=["acme"])
    done = world.run("--instance", "intruder")
    assert done.returncode == 1
    assert "holds the tables of instance exatron" in done.stdout
    world.instances = ["exatron"]
    world.assert_equal()


def test_a_failing_source_query_keeps_the_tenant_table_as_it_was(world):
    world.sync()
    before = world.actual("wpp_chats", "exatron")
    # the query fails half way through the stream (division by zero on one row)
    world.write_config("""  tables:
    - wpp_contacts
    - wpp_contact_sectors
    - name: wpp_chats
      source_query: |
        SELECT ch.id, ch.instance, ch.type, ch.avatar_url, ch.user_id, ch.contact_id, ch.sector_id, ch.started_at,
               ch.finished_at, ch.finished_by, ch.result_id, ch.is_finished, ch.is_schedule, ch.updated_at
        FROM chats ch WHERE ch.instance = %(instance)s
         AND 1 / (ch.id - (SELECT max(id) FROM chats WHERE instance = 'exatron')) IS NOT NULL
""")
    done = world.run("--full", "--instance", "exatron")
    assert done.returncode == 1
    assert "division by zero" in done.stdout
    assert world.actual("wpp_chats", "exatron") == before
    tables = [r[0] for r in world.mysql("SHOW TABLES", instance="exatron")]
    assert not [t for t in tables if "__dbdeck" in t], tables


@pytest.mark.parametrize("method", ["load_data", "insert"])
def test_values_arrive_byte_for_byte_and_odd_identifiers_are_quoted(world, method):
    world.pg('CREATE TABLE "Odd ""Notes"" v1" (id int PRIMARY KEY, instance text, body text, note_day date, '
             'weight numeric(6,2), payload jsonb, updated_at timestamptz DEFAULT now())')
    for number, text in enumerate(TRICKY + [None], start=1):
        world.pg('INSERT INTO "Odd ""Notes"" v1" VALUES (%s, %s, %s, current_date, 1.5, %s)',
                 (number, "exatron", text, json.dumps({"t": text})))
    world.write_config(f"""  method: {method}
  tables:
    - name: "tenant `notes`"
      ddl: "CREATE TABLE `tenant ``notes``` (id INT PRIMARY KEY, `note text` TEXT NULL, note_day DATE,
            weight DECIMAL(6,2), payload TEXT) DEFAULT CHARSET=utf8mb4"
      key: [id]
      watermark: updated_at
      source_query: |
        SELECT id, body AS "note text", note_day, weight, payload, updated_at
        FROM "Odd ""Notes"" v1" WHERE instance = %(instance)s AND body IS DISTINCT FROM 'never %%'
""", instances=["exatron"])
    world.sync()
    rows = world.mysql("SELECT id, `note text`, payload FROM `tenant ``notes``` ORDER BY id", instance="exatron")
    assert [r[1] for r in rows] == TRICKY + [None]
    assert [json.loads(r[2])["t"] for r in rows] == TRICKY + [None]
    # duplicate keys inside one batch collapse instead of failing it
    world.pg('INSERT INTO "Odd ""Notes"" v1" VALUES (100, %s, %s)', ("exatron", "dup"))
    world.write_config(f"""  method: {method}
  tables:
    - name: "tenant `notes`"
      key: [id]
      source_query: |
        SELECT id, body AS "note text", note_day, weight, payload, updated_at FROM "Odd ""Notes"" v1"
        WHERE instance = %(instance)s UNION ALL SELECT 100, 'dup again', NULL, NULL, NULL, now()
""", instances=["exatron"])
    result = world.sync("--full")
    assert result["instances"][0]["tables"]["tenant `notes`"]["collapsed"] == 1
    assert world.mysql("SELECT `note text` FROM `tenant ``notes``` WHERE id = 100", instance="exatron") in (
        (("dup",),), (("dup again",),))


def test_watch_delivers_a_change_and_catches_up_after_a_restart(world):
    assert world.run("setup").returncode == 0
    world.sync()
    process = subprocess.Popen([str(BIN / "local-sync"), "--config", str(world.config), "watch"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: world.mysql("SELECT 1 FROM dbdeck_local_sync_state", instance="acme"), 20)
        new_id = world.pg("INSERT INTO contacts (instance, name, phone) VALUES ('acme', 'Ao vivo', '5577') "
                          "RETURNING id")[0][0]
        assert wait_for(lambda: world.mysql("SELECT name FROM wpp_contacts WHERE id = %s", (new_id,),
                                            instance="acme") == (("Ao vivo",),), 20), "watch did not deliver"
        removed = world.pg("SELECT contact_id, sector_id FROM contact_sectors cs JOIN contacts c "
                           "ON c.id = cs.contact_id WHERE c.instance = 'acme' LIMIT 1")[0]
        world.pg("DELETE FROM contact_sectors WHERE contact_id = %s AND sector_id = %s", removed)
        assert wait_for(lambda: world.mysql("SELECT COUNT(*) FROM wpp_contact_sectors WHERE contact_id = %s "
                                            "AND sector_id = %s", removed, instance="acme")[0][0] == 0, 20)
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "listening" in err
    # changes made while nobody listened arrive with the catch-up round of the next start
    world.pg("UPDATE contacts SET name = 'Offline', updated_at = now() WHERE id = %s", (new_id,))
    process = subprocess.Popen([str(BIN / "local-sync"), "--config", str(world.config), "watch"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: world.mysql("SELECT name FROM wpp_contacts WHERE id = %s", (new_id,),
                                            instance="acme") == (("Offline",),), 20)
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    world.assert_equal()


def test_status_shows_rows_on_both_sides_and_the_last_sync(world):
    world.sync("--instance", "acme")
    done = world.run("status", "--format", "json")
    assert done.returncode == 0, done.stderr
    status = {entry["instance"]: entry for entry in json.loads(done.stdout)}
    contacts = status["acme"]["tables"]["wpp_contacts"]
    assert contacts["source_rows"] == contacts["target_rows"] == 500
    assert contacts["last_mode"] == "full" and contacts["lag_seconds"] is not None
    assert status["exatron"]["tables"]["wpp_contacts"]["last_sync"] is None
    assert status["exatron"]["tables"]["wpp_contacts"]["target_rows"] is None
    text = world.run("status")
    assert "wpp_contacts" in text.stdout and "source 500, tenant 500" in text.stdout


def test_english_summary_and_unknown_instance(world):
    world.write_config("  language: en\n")
    done = world.run("--instance", "acme")
    assert done.returncode == 0, done.stderr
    assert "[LocalSync] Summary: 500 contacts," in done.stdout
    assert "[LocalSync] Syncing contact sectors for: acme" in done.stdout
    typo = world.run("--instance", "acmee")
    assert typo.returncode == 2 and "no instance 'acmee' (known: exatron, acme)" in typo.stderr, typo.stderr
    databases = world.mysql("SHOW DATABASES LIKE %s", (world.tenant_db("acmee"),), database=None)
    assert databases == ()


def test_bad_configuration_is_a_clear_error_and_changes_nothing(world):
    world.write_config("  tables:\n    - name: custom_table\n")
    done = world.run()
    assert done.returncode == 2
    assert "source_query" in done.stderr
    world.write_config("""  tables:
    - name: wpp_contacts
      source_query: "SELECT id, instance, name FROM contacts WHERE instance = %(instance)s"
""")
    done = world.run("--instance", "acme")
    assert done.returncode == 1
    assert "gives no column(s) phone, customer_id, is_deleted" in done.stdout
    assert world.mysql("SHOW TABLES", instance="acme") == ()


def test_the_insert_path_splits_batches_to_fit_a_small_max_allowed_packet(world):
    world.write_config("  method: insert\n")
    previous = world.mysql("SELECT @@GLOBAL.max_allowed_packet", database=None)[0][0]
    world.mysql("SET GLOBAL max_allowed_packet = 16384", database=None)  # 1000 contacts are ~60 KB
    try:
        result = world.sync("--instance", "exatron")
    finally:
        world.mysql(f"SET GLOBAL max_allowed_packet = {int(previous)}", database=None)
    assert result["instances"][0]["tables"]["wpp_contacts"]["rows"] == 1000
    world.instances = ["exatron"]
    world.assert_equal()


def test_a_server_with_local_infile_off_gets_multi_row_inserts(world):
    world.mysql("SET GLOBAL local_infile = 0", database=None)
    try:
        world.write_config("  method: load_data\n", instances=["acme"])
        refused = world.run()
        assert refused.returncode == 1 and "needs local_infile=ON" in refused.stdout
        assert world.mysql("SHOW TABLES", instance="acme") == ()
        world.write_config("", instances=["acme"])  # method: auto
        world.sync()
    finally:
        world.mysql("SET GLOBAL local_infile = 1", database=None)
    world.instances = ["acme"]
    world.assert_equal()


def test_tables_left_by_a_killed_full_sync_are_dropped_by_the_next_run(world):
    world.sync("--instance", "acme")
    # what kill -9 in the middle of a full sync leaves: the half-loaded new copy (and, later, the old one)
    world.mysql("CREATE TABLE wpp_contacts__dbdeck_new LIKE wpp_contacts", instance="acme")
    world.mysql("INSERT INTO wpp_contacts__dbdeck_new VALUES (1, 'acme', 'half', 'x', NULL, 0)", instance="acme")
    world.mysql("CREATE TABLE wpp_chats__dbdeck_old LIKE wpp_chats", instance="acme")
    world.sync("--instance", "acme", "--full")
    tables = sorted(r[0] for r in world.mysql("SHOW TABLES", instance="acme"))
    assert tables == ["dbdeck_local_sync_state", "wpp_chats", "wpp_contact_sectors", "wpp_contacts"]
    world.instances = ["acme"]
    world.assert_equal()


def test_a_value_the_tenant_cannot_store_fails_the_table_and_changes_nothing(world):
    world.mysql(f"ALTER DATABASE {world.tenant_db('acme')} CHARACTER SET latin1", database=None)
    world.sync("--instance", "acme")  # plain sample names fit latin1
    world.pg("UPDATE contacts SET name = 'Emoji 🎉', updated_at = now() WHERE id = "
             "(SELECT min(id) FROM contacts WHERE instance = 'acme')")
    for method in ("load_data", "insert"):
        world.write_config(f"  method: {method}\n", instances=["acme"])
        for args in ((), ("--full",)):
            done = world.run("--instance", "acme", *args)
            assert done.returncode == 1, done.stdout
            assert "Incorrect string value" in done.stdout
            assert world.mysql("SELECT COUNT(*) FROM wpp_contacts WHERE name LIKE 'Emoji%%'", instance="acme") == ((0,),)
            assert world.mysql("SELECT COUNT(*) FROM wpp_contacts", instance="acme")[0][0] == 500


def test_a_long_reader_on_the_tenant_does_not_block_a_full_sync(world):
    world.write_config("  lock_wait_seconds: 1\n", instances=["acme"])
    world.sync()
    world.pg("UPDATE contacts SET name = 'during a long read', updated_at = now() WHERE id = "
             "(SELECT min(id) FROM contacts WHERE instance = 'acme')")
    world.pg("DELETE FROM chats WHERE id = (SELECT min(id) FROM chats WHERE instance = 'acme')")
    reader = pymysql.connect(host="127.0.0.1", port=world.maria.port, user="dbdeck", password=world.maria.password,
                             database=world.tenant_db("acme"), autocommit=False)
    try:
        with reader.cursor() as cursor:  # an open transaction that read the table holds its metadata lock
            cursor.execute("SELECT COUNT(*) FROM wpp_contacts")
        result = world.sync("--full")
    finally:
        reader.rollback()
        reader.close()
    tables = result["instances"][0]["tables"]
    assert tables["wpp_contacts"]["method"] == "merge"   # could not be renamed while read: merged in
    assert tables["wpp_chats"]["method"] == "swap" and tables["wpp_chats"]["rows"] == 374
    world.instances = ["acme"]
    world.assert_equal()
    tables = [r[0] for r in world.mysql("SHOW TABLES", instance="acme")]
    assert not [t for t in tables if "__dbdeck" in t], tables


def test_watch_reconnects_after_losing_the_main_database(world):
    assert world.run("setup").returncode == 0
    world.write_config("  watch: {reconnect_seconds: 1}\n", instances=["acme"])
    world.sync()
    process = subprocess.Popen([str(BIN / "local-sync"), "--config", str(world.config), "watch"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    listening = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%%'"
    try:
        assert wait_for(lambda: world.pg(listening)[0][0] == 1, 20), "watch never listened"
        # the connection drops (a restart, a failover): the listener's backend is gone
        world.pg("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%%'")
        new_id = world.pg("INSERT INTO contacts (instance, name, phone) VALUES ('acme', 'Depois', '5588') "
                          "RETURNING id")[0][0]
        assert wait_for(lambda: world.mysql("SELECT name FROM wpp_contacts WHERE id = %s", (new_id,),
                                            instance="acme") == (("Depois",),), 20), "not delivered after reconnect"
        assert wait_for(lambda: world.pg(listening)[0][0] == 1, 20), "watch did not listen again"
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "reconnecting" in err


@pytest.fixture
def silent_server():
    """A TCP port that accepts connections and never says a word (a hung MySQL, a stuck proxy)."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1], accepted
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    listener.close()


def test_a_tenant_server_that_never_answers_fails_that_tenant_within_connect_timeout(world, tmp_path, silent_server,
                                                                                    dbdeck_bin):
    port, accepted = silent_server
    world.write_config(f"""    - name: hung
      target: {{kind: mysql, host: 127.0.0.1, port: {port}, user: dbdeck, password_file: {tmp_path}/maria.pw,
               database: nowhere, connect_timeout: 2}}
""")
    done = world.run("--format", "json", timeout=90)
    assert done.returncode == 1
    result = json.loads(done.stdout)
    assert result["failed"] == ["hung"] and accepted
    assert "did not answer within 2s (connect_timeout)" in done.stderr
    world.assert_equal()  # the other tenants were synced
    status = world.run("status", timeout=90)
    assert status.returncode != 0 and "did not answer within 2s" in status.stdout + status.stderr
    (tmp_path / "endpoints.yaml").write_text(
        f"endpoints:\n  hung: {{kind: mysql, host: 127.0.0.1, port: {port}, user: x, "
        f"password_file: {tmp_path}/maria.pw, connect_timeout: 2}}\n")
    endpoints = dbdeck_bin("--config", tmp_path / "endpoints.yaml", "endpoints", timeout=90)
    assert endpoints.returncode == 1 and "did not answer within 2s (connect_timeout)" in endpoints.stdout


def _readme_prisma_tables():
    import re

    import yaml

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("A Prisma schema with its defaults")
    block = re.search(r"```yaml\n(.*?)```", readme[start:], re.S).group(1)
    return yaml.safe_load(textwrap.dedent(block))["local_sync"]["tables"]


def test_the_readmes_prisma_camelcase_mapping_works(world):
    # the sample schema as Prisma names it by default: model-named tables, camelCase columns
    world.pg('ALTER TABLE contacts RENAME TO "Contact"; '
             'ALTER TABLE "Contact" RENAME COLUMN customer_id TO "customerId"; '
             'ALTER TABLE "Contact" RENAME COLUMN deleted_at TO "deletedAt"; '
             'ALTER TABLE "Contact" RENAME COLUMN updated_at TO "updatedAt"; '
             'ALTER TABLE contact_sectors RENAME TO "ContactSector"; '
             'ALTER TABLE "ContactSector" RENAME COLUMN contact_id TO "contactId"; '
             'ALTER TABLE "ContactSector" RENAME COLUMN sector_id TO "sectorId"; '
             'ALTER TABLE "ContactSector" RENAME COLUMN updated_at TO "updatedAt"')
    tables = _readme_prisma_tables()
    world.write_config("  tables:\n" + textwrap.indent(yaml_dump(tables), "    "))
    setup = world.run("setup")
    assert setup.returncode == 0, setup.stdout + setup.stderr
    world.sync()
    contacts = world.pg('SELECT count(*) FROM "Contact" WHERE instance = %s', ("acme",))[0][0]
    assert world.mysql("SELECT COUNT(*) FROM wpp_contacts", instance="acme")[0][0] == contacts
    pair = world.pg('SELECT cs."contactId", cs."sectorId" FROM "ContactSector" cs JOIN "Contact" c '
                    'ON c.id = cs."contactId" WHERE c.instance = %s LIMIT 1', ("acme",))[0]
    world.pg('DELETE FROM "ContactSector" WHERE "contactId" = %s AND "sectorId" = %s', pair)
    world.pg('UPDATE "Contact" SET name = %s, "updatedAt" = now() WHERE id = %s', ("Camel", pair[0]))
    result = world.sync("--instance", "acme")
    acme = result["instances"][0]["tables"]
    assert acme["wpp_contact_sectors"]["removed"] == 1 and acme["wpp_contacts"]["rows"] == 1
    assert world.mysql("SELECT name FROM wpp_contacts WHERE id = %s", (pair[0],), instance="acme") == (("Camel",),)
    assert world.mysql("SELECT COUNT(*) FROM wpp_contact_sectors WHERE contact_id = %s AND sector_id = %s", pair,
                       instance="acme")[0][0] == 0


def yaml_dump(data):
    import yaml

    return yaml.safe_dump(data, sort_keys=False, width=200)
