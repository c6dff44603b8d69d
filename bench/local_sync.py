"""local-sync against the seed's approach (500-row INSERT ... ON DUPLICATE KEY UPDATE batches), in one run.

A throwaway PostgreSQL main database with the seed's source tables and one MariaDB server. Sizes:
DBDECK_BENCH_CONTACTS (default 1,000,000) contacts, twice as many contact-sector rows and half as
many chats, all for one instance (one tenant), written "a day ago".
  baseline     the seed's LocalSyncService: per table, read the source rows and upsert them in
               500-row multi-row INSERT ... ON DUPLICATE KEY UPDATE col = VALUES(col) statements,
               one commit each, into a tenant database of its own with the seed's tables
  full         `local-sync --instance bench` into an empty tenant (the first sync is full)
  incremental  1,000 rows changed in the source (600 contacts updated, 100 sectors removed and 100
               added, 200 chats updated), then `local-sync --instance bench`, three times (median);
               the process start-up is reported apart from the run itself (the engine's own time,
               from --format json, is what each round of `local-sync watch` costs)
  resync       `local-sync --full` over the now non-empty tenant
Prints rows/s and the ratios; absolute numbers are not comparable across machines.
"""

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
import pymysql  # noqa: E402

from dbdeck.plugins.local_sync.tables import BUILTIN_TABLES  # noqa: E402
from dbdeck.plugins.sandbox.servers import MariaDBServer, PostgresServer, free_port  # noqa: E402

CONTACTS = int(os.environ.get("DBDECK_BENCH_CONTACTS", "1000000"))
SOURCE_SCHEMA = """
CREATE TABLE contacts (id int PRIMARY KEY, instance varchar(255) NOT NULL, name varchar(255) NOT NULL,
    phone varchar(50) NOT NULL, customer_id int, deleted_at timestamptz, updated_at timestamptz NOT NULL,
    UNIQUE (instance, phone));
CREATE TABLE contact_sectors (contact_id int NOT NULL, sector_id int NOT NULL, updated_at timestamptz NOT NULL,
    PRIMARY KEY (contact_id, sector_id));
CREATE TABLE chats (id int PRIMARY KEY, instance varchar(255) NOT NULL, type varchar(50) NOT NULL, avatar_url text,
    user_id int, contact_id int NOT NULL, sector_id int, started_at timestamptz NOT NULL, finished_at timestamptz,
    finished_by int, result_id int, is_finished boolean NOT NULL DEFAULT false,
    is_schedule boolean NOT NULL DEFAULT false, updated_at timestamptz NOT NULL);
INSERT INTO contacts SELECT g, 'bench', 'Contato ' || g, '5511' || lpad(g::text, 9, '0'),
    CASE WHEN g % 3 = 0 THEN g % 5000 END, CASE WHEN g % 50 = 0 THEN now() - interval '2 days' END,
    now() - interval '1 day' - (g % 86400) * interval '1 second' FROM generate_series(1, {n}) g;
INSERT INTO contact_sectors SELECT g, s, now() - interval '1 day' FROM generate_series(1, {n}) g, (VALUES (1), (2)) v(s);
INSERT INTO chats SELECT g, 'bench', CASE WHEN g % 4 = 0 THEN 'group' ELSE 'individual' END,
    CASE WHEN g % 5 = 0 THEN 'https://cdn.example.com/avatars/' || g || '.jpg' END, g % 40, 1 + (g * 7) % {n},
    1 + g % 2, now() - (g % 100000) * interval '1 minute', CASE WHEN g % 2 = 0 THEN now() END,
    CASE WHEN g % 2 = 0 THEN g % 40 END, NULL, g % 2 = 0, g % 10 = 0, now() - interval '1 day'
    FROM generate_series(1, {chats}) g;
CREATE INDEX ON contacts (updated_at); CREATE INDEX ON contact_sectors (updated_at); CREATE INDEX ON chats (updated_at);
CREATE INDEX ON chats (instance); CREATE INDEX ON contact_sectors (contact_id);
ANALYZE;
"""
CHANGES = """
UPDATE contacts SET name = name || ' (editado)', updated_at = now() WHERE id % ({n} / 600) = {round};
DELETE FROM contact_sectors WHERE (contact_id, sector_id) IN (SELECT contact_id, 2 FROM contact_sectors
    WHERE sector_id = 2 ORDER BY contact_id LIMIT 100);
INSERT INTO contact_sectors SELECT g, 2 + {round}, now() FROM generate_series(1, 100) g;
UPDATE chats SET is_finished = true, finished_at = now(), updated_at = now() WHERE id IN (
    SELECT id FROM chats WHERE NOT is_finished ORDER BY id LIMIT 200);
"""
ROUNDS = 3


def seed_baseline(source_dsn, tenant_args):
    """The seed's syncContacts/syncContactSectors/syncChats: 500-row ODKU batches, one commit each."""
    target = pymysql.connect(**tenant_args, autocommit=False, charset="utf8mb4")
    rows = 0
    with psycopg.connect(source_dsn) as source, target.cursor() as cursor:
        for table, spec in BUILTIN_TABLES.items():
            cursor.execute(spec["ddl"])
            columns = spec["columns"]
            select = ", ".join(f"q.{c}" + ("::int" if c.startswith("is_") else "") for c in columns)
            updates = ", ".join(f"{c} = VALUES({c})" for c in columns if c not in spec["key"]) or \
                f"{columns[0]} = VALUES({columns[0]})"
            marks = "(" + ", ".join(["%s"] * len(columns)) + ")"
            with source.cursor(name=f"read_{table}") as reader:
                reader.itersize = 500
                reader.execute(f"SELECT {select} FROM ({spec['source_query']}) q", {"instance": "bench"})
                while batch := reader.fetchmany(500):
                    cursor.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                                   f"{', '.join([marks] * len(batch))} ON DUPLICATE KEY UPDATE {updates}",
                                   [value for row in batch for value in row])
                    target.commit()
                    rows += len(batch)
    target.close()
    return rows


def main():
    base = Path(tempfile.mkdtemp(prefix="dbdeck-bench-ls-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    password = secrets.token_urlsafe(16)
    pg = PostgresServer(base / "main", free_port())
    maria = MariaDBServer(base / "tenants", free_port())
    try:
        pg.init(password, {"autovacuum": "off", "max_wal_size": "'2GB'", "shared_buffers": "'256MB'"})
        pg.start()
        pg.psql("CREATE DATABASE crm")
        print(f"generating {CONTACTS:,} contacts, {2 * CONTACTS:,} contact sectors, {CONTACTS // 2:,} chats ...",
              flush=True)
        pg.psql(SOURCE_SCHEMA.format(n=CONTACTS, chats=CONTACTS // 2), database="crm")
        maria.init()
        maria.start(options=["--innodb-buffer-pool-size=1G", "--innodb-log-file-size=256M"])
        maria.sql("CREATE DATABASE tenant_bench; CREATE DATABASE baseline_bench;\n"
                  f"CREATE USER 'bench'@'127.0.0.1' IDENTIFIED BY '{password}';\n"
                  "GRANT ALL PRIVILEGES ON *.* TO 'bench'@'127.0.0.1';")
        (base / "pg.pw").write_text(password)
        config = base / "dbdeck.yaml"
        config.write_text(f"""dbdeck: {{state_dir: {base}/state, run_dir: {base}/run}}
local_sync:
  source: {{host: 127.0.0.1, port: {pg.port}, user: postgres, password_file: {base}/pg.pw, database: crm}}
  target_server: {{kind: mysql, host: 127.0.0.1, port: {maria.port}, user: bench, password_file: {base}/pg.pw}}
  database_pattern: "tenant_{{instance}}"
  instances: [bench]
  # the rounds below are seconds apart: with the default 300 s overlap each would re-read the previous
  # rounds' rows too; 0 measures exactly the 1,000 changes (the oldest-writer guard still applies)
  overlap_seconds: 0
""")
        command = [str(ROOT / "bin" / "local-sync"), "--config", str(config), "--format", "json"]
        source_dsn = f"host=127.0.0.1 port={pg.port} user=postgres password={password} dbname=crm"
        subprocess.run([*command, "setup"], check=True, stdout=subprocess.DEVNULL)

        started = time.perf_counter()
        baseline_rows = seed_baseline(source_dsn, {"host": "127.0.0.1", "port": maria.port, "user": "bench",
                                                   "password": password, "database": "baseline_bench"})
        baseline_seconds = time.perf_counter() - started

        def sync(*args):
            began = time.perf_counter()
            done = subprocess.run([*command, *args], check=True, capture_output=True, text=True)
            wall = time.perf_counter() - began
            result = json.loads(done.stdout)
            tables = result["instances"][0]["tables"]
            return wall, result["seconds"], sum(t["rows"] for t in tables.values()), tables

        full_wall, _, full_rows, _ = sync("--instance", "bench")
        incremental = []
        for number in range(1, ROUNDS + 1):
            quiesce(pg, maria)  # an incremental run comes minutes after a full one, not while it is flushed
            pg.psql(CHANGES.format(n=CONTACTS, round=number), database="crm")
            incremental.append(sync("--instance", "bench"))
        inc_wall, inc_engine, inc_rows, inc_tables = sorted(incremental, key=lambda r: r[0])[ROUNDS // 2]
        resync_wall, _, resync_rows, _ = sync("--instance", "bench", "--full")
        startup = min(_startup(config) for _ in range(3))

        counts = maria.sql("SELECT (SELECT COUNT(*) FROM tenant_bench.wpp_contacts), "
                           "(SELECT COUNT(*) FROM tenant_bench.wpp_contact_sectors), "
                           "(SELECT COUNT(*) FROM tenant_bench.wpp_chats)").split()
        print(f"tenant rows after the runs: {counts[0]} contacts, {counts[1]} sectors, {counts[2]} chats")
        print(f"baseline (500-row ODKU batches): {baseline_rows:,} rows in {baseline_seconds:.1f}s = "
              f"{baseline_rows / baseline_seconds:,.0f} rows/s")
        print(f"local-sync full (empty tenant):  {full_rows:,} rows in {full_wall:.1f}s = "
              f"{full_rows / full_wall:,.0f} rows/s   -> {baseline_seconds / full_wall:.2f}x the baseline's throughput")
        print(f"local-sync --full (non-empty):   {resync_rows:,} rows in {resync_wall:.1f}s = "
              f"{resync_rows / resync_wall:,.0f} rows/s   -> {baseline_seconds / resync_wall:.2f}x")
        removed = sum(t["removed"] for t in inc_tables.values())
        print("incremental per table: " + ", ".join(f"{name} {t['seconds']:.3f}s" for name, t in inc_tables.items()))
        print(f"incremental after 1,000 changes (median of {ROUNDS}): {inc_rows} rows upserted, {removed} removed; "
              f"{inc_wall:.3f}s wall = {inc_wall / full_wall:.4f}x the full sync "
              f"(engine {inc_engine:.3f}s = {inc_engine / full_wall:.4f}x; process start-up ~{startup:.3f}s)")
    finally:
        maria.destroy()
        pg.destroy()
        subprocess.run(["rm", "-rf", str(base)])


def quiesce(pg, maria, timeout=60):
    """Wait until both servers wrote out what the previous load left dirty."""
    pg.psql("CHECKPOINT")
    previous = maria.sql("SELECT @@GLOBAL.innodb_max_dirty_pages_pct").strip()
    maria.sql("SET GLOBAL innodb_max_dirty_pages_pct = 0")  # the page cleaner flushes at full speed
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dirty, total = (int(v) for v in maria.sql(
                "SELECT (SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS WHERE VARIABLE_NAME = "
                "'INNODB_BUFFER_POOL_PAGES_DIRTY'), (SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS "
                "WHERE VARIABLE_NAME = 'INNODB_BUFFER_POOL_PAGES_TOTAL')").split())
            if dirty <= total // 100:
                return
            time.sleep(0.5)
    finally:
        maria.sql(f"SET GLOBAL innodb_max_dirty_pages_pct = {float(previous)}")


def _startup(config):
    began = time.perf_counter()
    subprocess.run([str(ROOT / "bin" / "local-sync"), "--config", str(config), "--help"], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - began


if __name__ == "__main__":
    main()
