"""sync-databases against a row-by-row apply, on the same changes, in one run.

Two throwaway clusters; `perfis` set up on both; DBDECK_BENCH_ROWS (default 100000) rows inserted and
then updated on each side, so each side's changelog holds 2 x ROWS changes.
  baseline  what a straightforward script does: read local's changes and apply each one with its own
            statement and commit (INSERT ... ON CONFLICT DO UPDATE / DELETE), into a copy of the table
  dbdeck    `sync-databases run`: both directions, all changes
Prints changes per second for both and the ratio (absolute numbers are not comparable across machines).
"""

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
from psycopg.conninfo import make_conninfo  # noqa: E402

from dbdeck.plugins.sandbox.servers import PostgresServer, free_port  # noqa: E402

ROWS = int(os.environ.get("DBDECK_BENCH_ROWS", "100000"))
TABLE = ("CREATE TABLE perfis (id int PRIMARY KEY, nome text, email text, bio text, "
         "updated_at timestamptz NOT NULL DEFAULT now())")


def main():
    base = Path(tempfile.mkdtemp(prefix="dbdeck-bench-sdb-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    password = secrets.token_urlsafe(16)
    servers = {side: PostgresServer(base / side, free_port()) for side in ("local", "external")}
    try:
        dsns = {}
        for side, server in servers.items():
            server.init(password, {"autovacuum": "off", "max_wal_size": "'2GB'"})
            server.start()
            server.psql("CREATE DATABASE crm")
            server.psql(TABLE, database="crm")
            dsns[side] = make_conninfo(host="127.0.0.1", port=server.port, user="postgres", password=password,
                                       dbname="crm")
        servers["external"].psql("CREATE DATABASE baseline")
        servers["external"].psql(TABLE, database="baseline")
        env = {**os.environ, "DATABASE_URL": dsns["local"], "EXTERNAL_DB_URL": dsns["external"]}
        config = base / "dbdeck.yaml"
        config.write_text(f"dbdeck:\n  state_dir: {base}/state\n  run_dir: {base}/run\n")
        command = [str(ROOT / "bin" / "sync-databases"), "--config", str(config)]
        subprocess.run([*command, "setup"], env=env, check=True, stdout=subprocess.DEVNULL)
        offset = {"local": 0, "external": ROWS}
        for side, server in servers.items():
            server.psql(f"INSERT INTO perfis (id, nome, email, bio) SELECT g, 'nome ' || g, 'u' || g || '@x.org', "
                        f"repeat('b', 100) FROM generate_series({offset[side] + 1}, {offset[side] + ROWS}) g;"
                        f"UPDATE perfis SET nome = nome || ' (editado)';", database="crm")
        changes_per_side = 2 * ROWS

        # baseline: local's changes, one statement and one commit each
        baseline_dsn = make_conninfo(dsns["external"], dbname="baseline")
        with psycopg.connect(dsns["local"]) as source, psycopg.connect(baseline_dsn) as target:
            changes = source.execute("SELECT op, pk, data FROM perfis_changelog WHERE NOT synced ORDER BY id").fetchall()
            started = time.perf_counter()
            for op, pk, data in changes:
                if op == "D":
                    target.execute("DELETE FROM perfis WHERE id = %s", (pk["id"],))
                else:
                    target.execute("INSERT INTO perfis (id, nome, email, bio, updated_at) VALUES "
                                   "(%(id)s, %(nome)s, %(email)s, %(bio)s, %(updated_at)s) ON CONFLICT (id) DO UPDATE "
                                   "SET nome = EXCLUDED.nome, email = EXCLUDED.email, bio = EXCLUDED.bio, "
                                   "updated_at = EXCLUDED.updated_at", data)
                target.commit()
            baseline_seconds = time.perf_counter() - started
        baseline_rate = len(changes) / baseline_seconds

        started = time.perf_counter()
        subprocess.run([*command, "run"], env=env, check=True, stdout=subprocess.DEVNULL)
        dbdeck_seconds = time.perf_counter() - started
        dbdeck_rate = 2 * changes_per_side / dbdeck_seconds
        counts = [servers[side].psql("SELECT count(*) FROM perfis", database="crm").strip() for side in servers]
        if counts != [str(2 * ROWS)] * 2:
            raise SystemExit(f"sides differ after the sync: {counts}")
        print(f"changes: {changes_per_side} per side ({ROWS} inserts + {ROWS} updates)")
        print(f"row-by-row apply (baseline): {len(changes)} changes in {baseline_seconds:6.2f} s = "
              f"{baseline_rate:9.0f} changes/s")
        print(f"sync-databases run:          {2 * changes_per_side} changes in {dbdeck_seconds:6.2f} s = "
              f"{dbdeck_rate:9.0f} changes/s")
        print(f"ratio sync-databases / row-by-row throughput: {dbdeck_rate / baseline_rate:.1f}x  (target >= 10x)")
    finally:
        for server in servers.values():
            server.destroy()
        subprocess.run(["rm", "-rf", str(base)], check=False)


if __name__ == "__main__":
    main()
