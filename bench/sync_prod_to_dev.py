"""sync-prod-to-dev against the naive `pg_dump | psql`, on the same generated data, in one run.

Two throwaway clusters (same settings) on 127.0.0.1; prod gets DBDECK_BENCH_MB (default 500) of data
across 24 tables with indexes and foreign keys. Timed, each on a fresh target database:
  baseline   pg_dump prod | psql dev_baseline
  dbdeck     sync-prod-to-dev (first run: full copy into staging + swap)
  unchanged  sync-prod-to-dev again with prod untouched (the 5-minute cron's usual case)
Each full copy is timed three times (median). Prints wall times and the ratios to the baseline (absolute times are not comparable across machines).
"""

import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dbdeck.plugins.sandbox.servers import PostgresServer, free_port  # noqa: E402

TABLES = 24
TARGET_MB = int(os.environ.get("DBDECK_BENCH_MB", "500"))
REPEATS = 3


def generation_sql(rows_per_table):
    statements = ["CREATE TABLE accounts (id bigserial PRIMARY KEY, name text NOT NULL, created_at timestamptz)",
                  f"INSERT INTO accounts (name, created_at) SELECT 'account ' || g, now() - g * interval '1 min' "
                  f"FROM generate_series(1, {max(1000, rows_per_table // 50)}) g"]
    accounts = max(1000, rows_per_table // 50)
    for n in range(1, TABLES):
        statements += [
            f"CREATE TABLE t{n:02d} (id bigserial PRIMARY KEY, account_id bigint NOT NULL REFERENCES accounts, "
            f"amount numeric(12,2), status text, email text, payload jsonb, happened_at timestamptz, note text)",
            f"INSERT INTO t{n:02d} (account_id, amount, status, email, payload, happened_at, note) "
            f"SELECT 1 + (g * 7919) % {accounts}, (g % 100000) / 100.0, (ARRAY['new','paid','void'])[1 + g % 3], "
            f"'user' || g || '@example.com', jsonb_build_object('k', g, 'tag', 'x' || (g % 97)), "
            f"now() - (g % 100000) * interval '1 s', md5(g::text) || md5((g + 1)::text) "
            f"FROM generate_series(1, {rows_per_table}) g",
            f"CREATE INDEX t{n:02d}_account ON t{n:02d} (account_id)",
            f"CREATE INDEX t{n:02d}_happened ON t{n:02d} (happened_at)",
            f"CREATE UNIQUE INDEX t{n:02d}_email ON t{n:02d} (email)",
        ]
    return ";\n".join(statements) + ";\nANALYZE;\n"


def timed(argv, env=None, **kwargs):
    start = time.perf_counter()
    subprocess.run(argv, check=True, env={**os.environ, **(env or {})}, **kwargs)
    return time.perf_counter() - start


def main():
    base = Path(tempfile.mkdtemp(prefix="dbdeck-bench-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    password = secrets.token_urlsafe(16)
    servers = {name: PostgresServer(base / name, free_port()) for name in ("prod", "dev")}
    try:
        for server in servers.values():
            # autovacuum off: otherwise one run's inserts trigger vacuums that land in the next run's timing
            server.init(password, {"shared_buffers": "'256MB'", "max_wal_size": "'2GB'", "autovacuum": "off"})
            server.start()
        prod, dev = servers["prod"], servers["dev"]
        prod.psql("CREATE DATABASE app")
        # ~250 bytes per row of heap + indexes
        rows = TARGET_MB * 1024 * 1024 // 300 // (TABLES - 1)
        print(f"generating ~{TARGET_MB} MB in {TABLES} tables ({rows} rows each)...", flush=True)
        prod.psql(generation_sql(rows), database="app")
        size = prod.psql("SELECT pg_size_pretty(pg_database_size('app'))").strip()
        print(f"prod database size: {size}")
        env = {"PGPASSWORD": password, "PGHOST": "127.0.0.1", "PGUSER": "postgres"}
        bindir = str(prod.bindir)
        dump = f"{bindir}/pg_dump -p {prod.port} -d app"
        restore = f"{bindir}/psql -X -q -v ON_ERROR_STOP=1 -p {dev.port} -d app_baseline"
        baselines = []
        for _ in range(REPEATS):
            dev.psql("CREATE DATABASE app_baseline")
            baselines.append(timed(["bash", "-o", "pipefail", "-c", f"{dump} | {restore} >/dev/null"], env))
            dev.psql("DROP DATABASE app_baseline")
        baseline = statistics.median(baselines)

        config = base / "dbdeck.yaml"
        config.write_text(f"""
dbdeck:
  state_dir: {base}/state
  log_dir: {base}/log
endpoints:
  prod: {{host: 127.0.0.1, port: {prod.port}, user: postgres, database: app, password_file: {base}/pw, role: production}}
  dev: {{host: 127.0.0.1, port: {dev.port}, user: postgres, database: app, password_file: {base}/pw, role: development}}
sync_prod_to_dev:
  source: prod
  target: dev
  exclude_tables: []
""")
        pw = base / "pw"
        pw.write_text(password + "\n")
        pw.chmod(0o600)
        command = [str(ROOT / "bin" / "sync-prod-to-dev"), "--config", str(config)]
        clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PROD_", "DEV_"))}
        first = timed(command, clean_env, stdout=subprocess.DEVNULL)
        unchanged = timed(command, clean_env, stdout=subprocess.DEVNULL)
        copies = [first] + [timed([*command, "--force"], clean_env, stdout=subprocess.DEVNULL)
                            for _ in range(REPEATS - 1)]
        copy = statistics.median(copies)
        counts = [dev.psql(f"SELECT count(*) FROM t{n:02d}", database="app").strip() for n in (1, TABLES - 1)]
        if counts != [str(rows)] * 2:
            raise SystemExit(f"dev does not hold prod's rows after the sync: {counts}")
        print(f"pg_dump | psql (baseline)   {baseline:8.2f} s  (median of {REPEATS})")
        print(f"sync-prod-to-dev            {copy:8.2f} s  (median of {REPEATS}: first sync, then --force)")
        print(f"sync-prod-to-dev unchanged  {unchanged:8.2f} s")
        print(f"ratio sync-prod-to-dev / baseline:           {copy / baseline:.2f}x  (target <= 0.75x)")
        print(f"ratio unchanged sync-prod-to-dev / baseline: {unchanged / baseline:.3f}x  (target <= 0.05x)")
    finally:
        if os.environ.get("DBDECK_BENCH_KEEP"):
            print(f"kept for inspection: {base} (config {base}/dbdeck.yaml)")
            return
        for server in servers.values():
            server.destroy()
        subprocess.run(["rm", "-rf", str(base)], check=False)


if __name__ == "__main__":
    main()
