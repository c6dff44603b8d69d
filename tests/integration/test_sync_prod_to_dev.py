import os
import signal
import stat
import subprocess
import time

import pytest

from dbdeck.plugins.sync_prod_to_dev.quick import PROD_PROBE
from tests.conftest import BIN, _start_postgres, wait_for

# its tests share module-scoped servers and build on each other's state: one worker runs them all, in order
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("test_sync_prod_to_dev")]

SCHEMA = """
CREATE TABLE customers (id serial PRIMARY KEY, email text NOT NULL UNIQUE, note text);
CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id int NOT NULL REFERENCES customers(id),
                     total numeric(10,2) NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX orders_customer ON orders (customer_id);
CREATE TABLE _prisma_migrations (id text PRIMARY KEY, migration_name text NOT NULL);
CREATE VIEW big_orders AS SELECT * FROM orders WHERE total > 100;
CREATE SCHEMA "Sales Dept";
CREATE TABLE "Sales Dept"."Monthly ""Q"" Totals" (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    month date NOT NULL, amount numeric NOT NULL, doubled numeric GENERATED ALWAYS AS (amount * 2) STORED);
CREATE TABLE events (id bigint NOT NULL, at date NOT NULL, kind text) PARTITION BY RANGE (at);
CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
ALTER TABLE events ADD PRIMARY KEY (id, at);
CREATE INDEX events_kind ON events (kind);
COMMENT ON INDEX orders_customer IS 'orders by customer';
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN NEW.note := coalesce(NEW.note, 'touched'); RETURN NEW; END$$;
CREATE TRIGGER customers_touch BEFORE INSERT ON customers FOR EACH ROW EXECUTE FUNCTION touch();
CREATE MATERIALIZED VIEW order_totals AS SELECT customer_id, sum(total) AS total FROM orders GROUP BY 1;
CREATE UNIQUE INDEX order_totals_customer ON order_totals (customer_id);
ALTER TABLE orders ENABLE ROW LEVEL SECURITY;
CREATE POLICY orders_all ON orders USING (true);
"""


@pytest.fixture(scope="module")
def clusters(workdir):
    prod = _start_postgres(workdir, "sync-prod")
    dev = _start_postgres(workdir, "sync-dev")
    prod.server.psql("CREATE DATABASE crm_production;")
    dev.server.psql("CREATE DATABASE crm_development;")
    prod.server.psql(SCHEMA + """
        INSERT INTO customers (email, note) SELECT 'c' || g || '@example.com', md5(g::text) FROM generate_series(1, 2000) g;
        INSERT INTO orders (customer_id, total) SELECT 1 + g % 2000, (g % 500) / 3.0 FROM generate_series(1, 20000) g;
        INSERT INTO _prisma_migrations VALUES ('1', 'prod_migration');
        INSERT INTO "Sales Dept"."Monthly ""Q"" Totals" (month, amount) SELECT date '2025-01-01' + g, g FROM generate_series(1, 300) g;
        INSERT INTO events SELECT g, date '2025-06-01' + g % 400, 'k' || g % 7 FROM generate_series(1, 5000) g;
        REFRESH MATERIALIZED VIEW order_totals;
    """, database="crm_production")
    dev.server.psql("CREATE TABLE _prisma_migrations (id text PRIMARY KEY, migration_name text NOT NULL);"
                    "INSERT INTO _prisma_migrations VALUES ('d', 'dev_only_migration');"
                    "CREATE TABLE stale_dev_table (x int);", database="crm_development")
    yield prod, dev
    prod.server.destroy()
    dev.server.destroy()


def write_config(tmp_path, prod, dev, extra="", target_role="development"):
    secrets = tmp_path / "secrets"
    secrets.mkdir(exist_ok=True)
    for name, cluster in (("prod", prod), ("dev", dev)):
        (secrets / name).write_text(cluster.password)
        os.chmod(secrets / name, 0o600)
    config = tmp_path / "dbdeck.yaml"
    config.write_text(f"""
dbdeck:
  run_dir: {tmp_path}/run
  state_dir: {tmp_path}/state
  log_dir: {tmp_path}/logs
endpoints:
  prod: {{host: 127.0.0.1, port: {prod.port}, user: postgres, password_file: {secrets}/prod, database: crm_production,
          role: production}}
  dev: {{host: 127.0.0.1, port: {dev.port}, user: postgres, password_file: {secrets}/dev, database: crm_development,
         role: {target_role}}}
sync_prod_to_dev:
  source: prod
  target: dev
{extra}""")
    return config


def sync(config, *args, env=None):
    return subprocess.run([str(BIN / "sync-prod-to-dev"), "--config", str(config), *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def checksums(endpoint):
    tables = [r["t"] for r in endpoint.query(
        "SELECT format('%I.%I', schemaname, tablename) AS t FROM pg_tables WHERE schemaname NOT IN "
        "('pg_catalog', 'information_schema') UNION ALL SELECT format('%I.%I', schemaname, matviewname) "
        "FROM pg_matviews ORDER BY 1")]
    out = {}
    for table in tables:
        out[table.removeprefix("public.")] = endpoint.query(
            f"SELECT count(*) AS n, md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) AS sum FROM {table} t")[0]
    sequences = endpoint.query("SELECT sequencename, last_value FROM pg_sequences ORDER BY 1")
    return out, sequences


def schema_of(cluster, database):
    """Every object's definition (indexes, keys, triggers, policies, comments...), excluded table aside."""
    dump = cluster.endpoint(database).run_tool("pg_dump", "--schema-only", "--no-owner", "--no-privileges",
                                               "--exclude-table=_prisma_migrations", read_only=True).stdout
    return [line for line in dump.splitlines() if not line.startswith(("\\restrict", "\\unrestrict"))]


def test_full_copy_keeps_excluded_tables_and_terminates_sessions(clusters, tmp_path):
    prod, dev = clusters
    config = write_config(tmp_path, prod, dev)
    session = dev.endpoint("crm_development").connect()
    done = sync(config)
    assert done.returncode == 0, done.stderr
    prod_sums, prod_seqs = checksums(prod.endpoint("crm_production"))
    dev_sums, dev_seqs = checksums(dev.endpoint("crm_development"))
    assert prod_sums.pop("_prisma_migrations") != dev_sums.pop("_prisma_migrations")
    assert dev_sums == prod_sums and dev_seqs == prod_seqs
    assert "order_totals" in dev_sums and '"Sales Dept"."Monthly ""Q"" Totals"' in dev_sums
    assert "parallel streams" in done.stdout and "building" in done.stdout
    assert schema_of(dev, "crm_development") == schema_of(prod, "crm_production")
    assert dev.endpoint("crm_development").query("SELECT migration_name FROM _prisma_migrations") == \
        [{"migration_name": "dev_only_migration"}]
    assert dev.endpoint("crm_development").query("SELECT count(*) AS n FROM big_orders")[0]["n"] > 0
    with pytest.raises(Exception):
        session.execute("SELECT 1")
    names = {r["datname"] for r in dev.endpoint().query("SELECT datname FROM pg_database")}
    assert not any("__dbdeck_" in n for n in names)
    log_file = tmp_path / "logs" / f"sync-{time.strftime('%Y%m%d')}.log"
    assert "sync complete" in log_file.read_text() and prod.password not in log_file.read_text()

    again = sync(config)
    assert again.returncode == 0 and "prod unchanged since the last sync" in again.stdout
    prod.endpoint("crm_production").execute("UPDATE customers SET note = 'changed' WHERE id = 1")
    changed = sync(config)
    assert changed.returncode == 0 and "sync complete" in changed.stdout
    assert dev.endpoint("crm_development").query("SELECT note FROM customers WHERE id = 1") == [{"note": "changed"}]


def test_dry_run_changes_nothing(clusters, tmp_path):
    prod, dev = clusters
    config = write_config(tmp_path, prod, dev)
    before = checksums(dev.endpoint("crm_development"))
    done = sync(config, "--dry-run", "--force")
    assert done.returncode == 0, done.stderr
    assert "[dry-run] would run:" in done.stdout and "pg_dump -Fc" in done.stdout and prod.password not in done.stdout
    assert checksums(dev.endpoint("crm_development")) == before
    names = {r["datname"] for r in dev.endpoint().query("SELECT datname FROM pg_database")}
    assert not any("__dbdeck_" in n for n in names)


def test_refuses_production_target_and_same_database(clusters, tmp_path):
    prod, dev = clusters
    config = write_config(tmp_path, prod, dev, target_role="production")
    done = sync(config, "--force")
    assert done.returncode == 1 and "marked role: production" in done.stderr
    same = write_config(tmp_path, prod, prod).read_text().replace("database: crm_development",
                                                                   "database: crm_production")
    (tmp_path / "same.yaml").write_text(same)
    done = sync(tmp_path / "same.yaml", "--force")
    assert done.returncode == 1 and "source and target are the same database" in done.stderr
    assert prod.endpoint("crm_production").query("SELECT count(*) AS n FROM orders")[0]["n"] >= 20000

    # the same dev database under a second endpoint marked production, and an inline target naming it
    marker = write_config(tmp_path, prod, dev).read_text().replace(
        "sync_prod_to_dev:", f"  live: {{host: 127.0.0.1, port: {dev.port}, user: postgres, database: crm_development,"
                             f" role: production}}\nsync_prod_to_dev:")
    inline = marker.replace("  target: dev", f"  target: {{host: 127.0.0.1, port: {dev.port}, user: postgres, "
                                              f"password_file: {tmp_path}/secrets/dev, database: crm_development}}")
    before = checksums(dev.endpoint("crm_development"))
    for text in (marker, inline):
        (tmp_path / "aliased.yaml").write_text(text)
        done = sync(tmp_path / "aliased.yaml", "--force")
        assert done.returncode == 1 and "as endpoint live, which is marked role: production" in done.stderr, \
            done.stderr
    assert checksums(dev.endpoint("crm_development")) == before


def test_kill_9_mid_restore_leaves_dev_intact_and_next_run_cleans_up(clusters, tmp_path):
    prod, dev = clusters
    prod.endpoint("crm_production").execute(
        "CREATE TABLE IF NOT EXISTS bulk AS SELECT g AS id, repeat(md5(g::text), 8) AS payload "
        "FROM generate_series(1, 400000) g")
    config = write_config(tmp_path, prod, dev)
    dev_ep = dev.endpoint("crm_development")
    dev_ep.execute("CREATE TABLE IF NOT EXISTS marker_before_kill (x int)")
    before = checksums(dev_ep)
    process = subprocess.Popen([str(BIN / "sync-prod-to-dev"), "--config", str(config), "--force"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    staging_seen = wait_for(lambda: dev.endpoint().query(
        "SELECT count(*) AS n FROM pg_database WHERE datname = 'crm_development__dbdeck_staging'")[0]["n"] == 1,
        timeout=30, pause=0.02)
    assert staging_seen
    time.sleep(0.3)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    # its pg_dump/pg_restore children do not go on working for nobody (the kernel stops them with dbdeck)
    assert wait_for(lambda: not copy_sessions(prod, dev), timeout=15, pause=0.1), copy_sessions(prod, dev)
    assert checksums(dev_ep) == before  # dev still serves the old copy
    done = sync(config, "--force")
    assert done.returncode == 0, done.stderr
    assert "left by an interrupted run" in done.stdout
    assert dev_ep.query("SELECT count(*) AS n FROM bulk")[0]["n"] == 400000
    assert dev_ep.query("SELECT to_regclass('marker_before_kill') IS NULL AS gone")[0]["gone"]
    names = {r["datname"] for r in dev.endpoint().query("SELECT datname FROM pg_database")}
    assert not any("__dbdeck_" in n for n in names)
    prod.endpoint("crm_production").execute("DROP TABLE bulk")


def copy_sessions(prod, dev):
    """Sessions of a copy in progress: pg_dump on prod, anything on dev's staging database."""
    return (prod.endpoint().query("SELECT pid, application_name FROM pg_stat_activity "
                                  "WHERE application_name = 'pg_dump' AND datname = 'crm_production'")
            + dev.endpoint().query("SELECT pid, application_name FROM pg_stat_activity "
                                   "WHERE datname LIKE '%\\_\\_dbdeck\\_%'"))


def test_sigterm_mid_copy_stops_children_drops_staging_exits_143(clusters, tmp_path):
    prod, dev = clusters
    prod.endpoint("crm_production").execute(
        "CREATE TABLE IF NOT EXISTS bulk_term AS SELECT g AS id, repeat(md5(g::text), 8) AS payload "
        "FROM generate_series(1, 300000) g")
    config = write_config(tmp_path, prod, dev)
    dev_ep = dev.endpoint("crm_development")
    try:
        before = checksums(dev_ep)
        # at different steps: schema, data streams, index builds (each one a different thread layout)
        for delay in (0.3, 1.2, 2.5):
            process = subprocess.Popen([str(BIN / "sync-prod-to-dev"), "--config", str(config), "--force"],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert wait_for(lambda: copy_sessions(prod, dev), timeout=30, pause=0.02)
            time.sleep(delay)
            process.send_signal(signal.SIGTERM)
            out, err = process.communicate(timeout=60)
            if process.returncode == 0:  # finished before the signal: dev is the new copy
                before = checksums(dev_ep)
                continue
            assert process.returncode == 143, err
            assert "Terminated." in err and "Traceback" not in err
            assert "dropping crm_development__dbdeck_staging" in out
            assert not copy_sessions(prod, dev)
            names = {r["datname"] for r in dev.endpoint().query("SELECT datname FROM pg_database")}
            assert not any("__dbdeck_" in n for n in names)
            assert checksums(dev_ep) == before
    finally:
        prod.endpoint("crm_production").execute("DROP TABLE IF EXISTS bulk_term")


def test_sigterm_at_the_swap_leaves_dev_old_and_open_before_its_commit_and_new_after_it(clusters, tmp_path):
    """A SIGTERM at the last step: before the rename commits, dev is as it was, open, and staging is dropped
    (exit 143); once the commit has begun, the run finishes (dev is the new copy, nothing left over) and
    exits 0, where stopping halfway would leave dev closed or the old copy behind."""
    prod, dev = clusters
    config = write_config(tmp_path, prod, dev)
    dev_ep = dev.endpoint("crm_development")
    prod.endpoint("crm_production").execute("CREATE TABLE IF NOT EXISTS swap_probe (id int)")
    try:
        before = checksums(dev_ep)
        stopped = subprocess.run([str(BIN / "sync-prod-to-dev"), "--config", str(config), "--force"],
                                 capture_output=True, text=True, timeout=300,
                                 env={**os.environ, "DBDECK_FAILPOINT": "swap.dev-closed:sigterm"})
        assert stopped.returncode == 143, stopped.stdout + stopped.stderr
        assert "Terminated." in stopped.stderr and "Traceback" not in stopped.stderr
        assert "dropping crm_development__dbdeck_staging" in stopped.stdout
        assert checksums(dev_ep) == before  # and connecting worked: dev was opened again
        names = {r["datname"] for r in dev.endpoint().query("SELECT datname FROM pg_database")}
        assert not any("__dbdeck_" in n for n in names), names

        finished = subprocess.run([str(BIN / "sync-prod-to-dev"), "--config", str(config), "--force"],
                                  capture_output=True, text=True, timeout=300,
                                  env={**os.environ, "DBDECK_FAILPOINT": "swap.committing:sigterm"})
        assert finished.returncode == 0, finished.stdout + finished.stderr
        assert "sync complete" in finished.stdout and "Terminated." not in finished.stderr
        assert "swap_probe" in checksums(dev_ep)[0], finished.stdout  # the new copy
        names = {r["datname"] for r in dev.endpoint().query("SELECT datname FROM pg_database")}
        assert not any("__dbdeck_" in n for n in names), names
    finally:
        prod.endpoint("crm_production").execute("DROP TABLE IF EXISTS swap_probe")


def test_closed_stdout_does_not_stop_the_sync(clusters, tmp_path):
    prod, dev = clusters
    config = write_config(tmp_path, prod, dev)
    done = subprocess.run(["bash", "-o", "pipefail", "-c",
                           f"{BIN / 'sync-prod-to-dev'} --config {config} --force | head -1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("source: ") and done.stdout.count("\n") == 1
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
    names = {r["datname"] for r in dev.endpoint().query("SELECT datname FROM pg_database")}
    assert not any("__dbdeck_" in n for n in names)
    prod_sums, _ = checksums(prod.endpoint("crm_production"))
    dev_sums, _ = checksums(dev.endpoint("crm_development"))
    prod_sums.pop("_prisma_migrations"), dev_sums.pop("_prisma_migrations")
    assert prod_sums == dev_sums
    log = "".join(p.read_text() for p in (tmp_path / "logs").glob("sync-*.log"))
    assert "sync complete" in log


def test_dump_retention_keeps_exactly_n(clusters, tmp_path):
    prod, dev = clusters
    config = write_config(tmp_path, prod, dev, extra=f"  dump_dir: {tmp_path}/dumps\n  keep_dumps: 2\n")
    for _ in range(3):
        done = sync(config, "--force")
        assert done.returncode == 0, done.stderr
        time.sleep(1.05)  # dump names carry the second
    dumps = sorted((tmp_path / "dumps").iterdir())
    assert len(dumps) == 2
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in dumps)


@pytest.fixture
def small_filesystem(tmp_path):
    """A real filesystem that fills up: a 24 MiB tmpfs."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_dump_files_are_complete_or_absent_after_kill_9_and_a_full_disk(clusters, tmp_path, small_filesystem):
    prod, dev = clusters
    prod_ep, dev_ep = prod.endpoint("crm_production"), dev.endpoint("crm_development")
    prod_ep.execute("CREATE TABLE IF NOT EXISTS dump_bulk AS SELECT g AS id, md5(g::text) || md5((-g)::text) AS v "
                    "FROM generate_series(1, 250000) g")
    dumps = small_filesystem / "dumps"
    config = write_config(tmp_path, prod, dev, extra=f"  dump_dir: {dumps}\n  keep_dumps: 1\n")
    try:
        first = sync(config, "--force")
        assert first.returncode == 0, first.stderr
        [good] = list(dumps.iterdir())
        good_size = good.stat().st_size
        assert good.name.endswith(".dump") and good_size > 2_000_000

        # a full disk: the run fails and says why, the good dump survives, nothing half-written stays
        before = checksums(dev_ep)
        filler = small_filesystem / "filler"
        free = os.statvfs(small_filesystem).f_bavail * os.statvfs(small_filesystem).f_frsize
        filler.write_bytes(b"\0" * max(0, free - good_size // 2))
        time.sleep(1.05)
        full = sync(config, "--force")
        assert full.returncode == 1
        assert "No space left on device" in full.stderr and "Traceback" not in full.stderr, full.stderr
        assert [p.name for p in dumps.iterdir()] == [good.name]
        assert checksums(dev_ep) == before
        filler.unlink()

        # kill -9 while pg_dump is writing: what is left is a .partial, never a *.dump
        time.sleep(1.05)
        process = subprocess.Popen([str(BIN / "sync-prod-to-dev"), "--config", str(config), "--force"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for(lambda: any(p.name.endswith(".partial") and p.stat().st_size > 100_000
                                    for p in dumps.iterdir()), timeout=60, pause=0.005)
        os.killpg(process.pid, signal.SIGKILL) if os.getpgid(process.pid) == process.pid else \
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
        assert sorted(p.name for p in dumps.glob("*.dump")) == [good.name]
        assert any(p.name.endswith(".dump.partial") for p in dumps.iterdir())

        # the next run cleans the leftovers, writes a complete dump, and only then prunes
        time.sleep(1.05)
        again = sync(config, "--force")
        assert again.returncode == 0, again.stderr
        [latest] = list(dumps.iterdir())
        assert latest.name != good.name and latest.name.endswith(".dump")
        listing = subprocess.run(["pg_restore", "--file=/dev/null", str(latest)], capture_output=True, text=True)
        assert listing.returncode == 0, listing.stderr
        assert dev_ep.query("SELECT count(*) AS n FROM dump_bulk")[0]["n"] == 250000
    finally:
        prod_ep.execute("DROP TABLE IF EXISTS dump_bulk")


def test_full_log_and_state_filesystem_is_one_line_each(clusters, tmp_path, small_filesystem):
    prod, dev = clusters
    config = write_config(tmp_path, prod, dev)
    text = config.read_text().replace(f"{tmp_path}/state", f"{small_filesystem}/state").replace(
        f"{tmp_path}/logs", f"{small_filesystem}/logs")
    config.write_text(text)
    for sub in ("state", "logs"):
        (small_filesystem / sub).mkdir()
    first = sync(config, "--force")
    assert first.returncode == 0, first.stderr
    prod.endpoint("crm_production").execute("INSERT INTO customers (email) VALUES ('full-disk@example.com')")
    for log in (small_filesystem / "logs").iterdir():
        log.unlink()  # a new day's file: no page left with room in it
    with open(small_filesystem / "filler", "wb") as filler:
        try:
            while True:
                filler.write(b"\0" * 65536)
                filler.flush()
        except OSError:
            pass
    done = sync(config)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "Logging error" not in done.stderr, done.stderr
    assert done.stderr.count("No space left on device") <= 2 and "could not save" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) <= 2, done.stderr
    dev_ep = dev.endpoint("crm_development")
    assert dev_ep.query("SELECT count(*) AS n FROM customers WHERE email = 'full-disk@example.com'")[0]["n"] == 1
    (small_filesystem / "filler").unlink()
    prod.endpoint("crm_production").execute("DELETE FROM customers WHERE email = 'full-disk@example.com'")
    again = sync(config)
    assert again.returncode == 0, again.stderr
    assert dev_ep.query("SELECT count(*) AS n FROM customers WHERE email = 'full-disk@example.com'")[0]["n"] == 0


def test_second_run_while_one_is_going_exits_75(clusters, tmp_path):
    from dbdeck.lock import JobLock

    prod, dev = clusters
    config = write_config(tmp_path, prod, dev)
    with JobLock("sync-prod-to-dev", tmp_path / "run"):
        done = sync(config)
    assert done.returncode == 75 and "already running" in done.stderr


def test_seed_container_mode_with_seed_environment(crm_containers, tmp_path):
    prod_container, dev_container = crm_containers["prod"], crm_containers["dev"]
    for container, database in ((prod_container, "crm_production"), (dev_container, "crm_development")):
        subprocess.run(["docker", "exec", container, "psql", "-U", "postgres", "-c",
                        f"DROP DATABASE IF EXISTS {database}", "-c", f"CREATE DATABASE {database}"],
                       check=True, capture_output=True)
    subprocess.run(["docker", "exec", "-i", prod_container, "psql", "-U", "postgres", "-d", "crm_production",
                    "-v", "ON_ERROR_STOP=1"], input=SCHEMA + "INSERT INTO customers (email) VALUES ('a@x'), ('b@x');"
                   "INSERT INTO _prisma_migrations VALUES ('p', 'prod');", text=True, check=True, capture_output=True)
    config = tmp_path / "dbdeck.yaml"
    config.write_text(f"dbdeck:\n  run_dir: {tmp_path}/run\n  state_dir: {tmp_path}/state\n")
    env = {"PROD_DB_CONTAINER": prod_container, "PROD_DATABASE": "crm_production", "PROD_DB_USER": "postgres",
           "DEV_DB_CONTAINER": dev_container, "DEV_DATABASE": "crm_development", "DEV_DB_USER": "postgres",
           "EXCLUDE_TABLES": "_prisma_migrations sensitive_data"}
    done = sync(config, env=env)
    assert done.returncode == 0, done.stderr
    assert f"container {dev_container}" in done.stdout
    rows = subprocess.run(["docker", "exec", dev_container, "psql", "-U", "postgres", "-d", "crm_development", "-At",
                           "-c", "SELECT count(*) FROM customers", "-c", "SELECT count(*) FROM _prisma_migrations"],
                          capture_output=True, text=True, check=True).stdout.split()
    assert rows == ["2", "0"]  # excluded: dev had no copy, so prod's structure without its rows


def relation_bytes(cluster, database, table):
    cluster.endpoint(database).execute("CHECKPOINT")  # what is in shared buffers reaches the files
    path = cluster.endpoint(database).query(f"SELECT pg_relation_filepath('{table}') AS p")[0]["p"]
    return (cluster.server.datadir / path).read_bytes()


def test_anonymised_values_never_reach_dev(clusters, tmp_path):
    import textwrap

    prod, dev = clusters
    site = tmp_path / "site"
    (site / "dbdeck_reverse").mkdir(parents=True)
    (site / "dbdeck_reverse" / "__init__.py").write_text(textwrap.dedent("""
        from dbdeck.hookspecs import hookimpl

        @hookimpl
        def row_transformers():
            return {"reverse": lambda value, **options: value[::-1] + options.get("suffix", "")}
    """))
    dist = site / "dbdeck_reverse-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dbdeck-reverse\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[dbdeck.plugins]\nreverse = dbdeck_reverse\n")
    config = write_config(tmp_path, prod, dev, extra="""  anonymize:
    customers.email: email_mask
    orders.total: {rule: fixed, value: '0'}
    customers.note: {rule: reverse, suffix: '!'}
  anonymize_salt: ${SALT}
""")
    raw = prod.endpoint("crm_production").query("SELECT email, note FROM customers WHERE id = 7")[0]
    done = sync(config, "--force", env={"SALT": "pepper-for-tests", "PYTHONPATH": str(site)})
    assert done.returncode == 0, done.stderr
    row = dev.endpoint("crm_development").query("SELECT email, note FROM customers WHERE id = 7")[0]
    assert row["email"] != raw["email"] and row["email"].startswith("c") and row["email"].endswith("@example.com")
    assert row["note"] == raw["note"][::-1] + "!"
    assert dev.endpoint("crm_development").query("SELECT count(DISTINCT email) AS n FROM customers")[0]["n"] == 2000
    assert dev.endpoint("crm_development").query("SELECT sum(total) AS s FROM orders")[0]["s"] == 0
    # every raw e-mail as it would sit on disk (1-byte varlena header + bytes): none may be in dev's files
    stored = relation_bytes(dev, "crm_development", "customers")
    raw_emails = [r["email"].encode() for r in prod.endpoint("crm_production").query("SELECT email FROM customers")]
    assert not [e for e in raw_emails if bytes([((len(e) + 1) << 1) | 1]) + e in stored]
    assert bytes([((len(raw_emails[0]) + 1) << 1) | 1]) + raw_emails[0] in relation_bytes(prod, "crm_production",
                                                                                           "customers")
    again = sync(config, "--force", env={"SALT": "pepper-for-tests", "PYTHONPATH": str(site)})
    assert dev.endpoint("crm_development").query("SELECT email FROM customers WHERE id = 7")[0]["email"] == row["email"]
    assert again.returncode == 0


def test_bad_anonymisation_rule_leaves_dev_untouched(clusters, tmp_path):
    prod, dev = clusters
    before = checksums(dev.endpoint("crm_development"))
    config = write_config(tmp_path, prod, dev, extra="  anonymize:\n    customers.no_such_column: null\n")
    done = sync(config, "--force")
    assert done.returncode == 1 and "column public.customers.no_such_column does not exist" in done.stderr
    assert checksums(dev.endpoint("crm_development")) == before
    names = {r["datname"] for r in dev.endpoint().query("SELECT datname FROM pg_database")}
    assert not any("__dbdeck_" in n for n in names)
    unsalted = write_config(tmp_path, prod, dev, extra="  anonymize:\n    customers.email: hash\n")
    done = sync(unsalted, "--force")
    assert done.returncode == 1 and "need anonymize_salt" in done.stderr
    malformed = write_config(tmp_path, prod, dev, extra="  anonymize:\n    customers: email_mask\n")
    done = sync(malformed, "--force")
    assert done.returncode == 2 and "expected table.column" in done.stderr


def test_owner_and_grants_kept_when_configured_and_missing_roles_named(clusters, tmp_path):
    prod, dev = clusters
    roles = ("DO $$BEGIN CREATE ROLE crm_app; EXCEPTION WHEN duplicate_object THEN NULL; END$$;"
             "DO $$BEGIN CREATE ROLE crm_reader; EXCEPTION WHEN duplicate_object THEN NULL; END$$;")
    prod.server.psql(roles)
    prod.server.psql("CREATE TABLE owned_by_app (x int); ALTER TABLE owned_by_app OWNER TO crm_app;"
                     "GRANT SELECT ON owned_by_app TO crm_reader;", database="crm_production")
    try:
        config = write_config(tmp_path, prod, dev, "  keep_owner: true\n  keep_privileges: true\n")
        refused = sync(config, "--force")
        assert refused.returncode == 1
        assert "crm_app, crm_reader" in refused.stderr and "do not exist on dev" in refused.stderr
        assert dev.endpoint("crm_development").query("SELECT to_regclass('owned_by_app') AS t") == [{"t": None}]

        dev.server.psql(roles)
        done = sync(config, "--force")
        assert done.returncode == 0, done.stderr
        kept = dev.endpoint("crm_development").query(
            "SELECT tableowner, has_table_privilege('crm_reader', 'owned_by_app', 'SELECT') AS can_read "
            "FROM pg_tables WHERE tablename = 'owned_by_app'")
        assert kept == [{"tableowner": "crm_app", "can_read": True}]

        default = sync(write_config(tmp_path, prod, dev), "--force")
        assert default.returncode == 0, default.stderr
        assert dev.endpoint("crm_development").query(
            "SELECT tableowner, has_table_privilege('crm_reader', 'owned_by_app', 'SELECT') AS can_read "
            "FROM pg_tables WHERE tablename = 'owned_by_app'") == [{"tableowner": "postgres", "can_read": False}]
    finally:
        prod.server.psql("DROP TABLE owned_by_app", database="crm_production")


def test_host_pg_dump_older_than_prod_is_refused_before_anything_changes(clusters, tmp_path):
    prod, dev = clusters
    fake = tmp_path / "old-client"
    fake.mkdir()
    (fake / "pg_dump").write_text("#!/bin/sh\necho 'pg_dump (PostgreSQL) 9.6.24'\n")
    (fake / "pg_dump").chmod(0o755)
    done = sync(write_config(tmp_path, prod, dev), "--force", env={"PATH": f"{fake}:{os.environ['PATH']}"})
    assert done.returncode == 1
    assert "pg_dump on PATH is version 9" in done.stderr and "postgresql-client-" in done.stderr
    names = {r["datname"] for r in dev.endpoint().query("SELECT datname FROM pg_database")}
    assert not any("__dbdeck_" in n for n in names)


def test_a_target_database_name_is_a_name_never_a_connection_string(clusters, tmp_path):
    prod, dev = clusters
    weird = "dbname=other application_name="
    dev.server.psql("DROP DATABASE IF EXISTS other; CREATE DATABASE other;")
    dev.server.psql("CREATE TABLE marker (x int); INSERT INTO marker VALUES (42);", database="other")
    config = write_config(tmp_path, prod, dev)
    config.write_text(config.read_text().replace("database: crm_development", f"database: '{weird}'"))
    try:
        done = sync(config)
        assert done.returncode == 0, done.stderr
        assert dev.endpoint(weird).query("SELECT count(*) AS n FROM customers")[0]["n"] == 2000
        other = dev.endpoint("other").query(
            "SELECT array_agg(tablename::text ORDER BY tablename) AS t FROM pg_tables WHERE schemaname = 'public'")
        assert other[0]["t"] == ["marker"]
    finally:
        dev.server.psql(f"DROP DATABASE IF EXISTS \"{weird}\" WITH (FORCE); DROP DATABASE IF EXISTS other;")


def test_dev_name_near_the_63_byte_limit_syncs_every_time(clusters, tmp_path):
    prod, dev = clusters
    long_name = "crm_development_" + "l" * 40  # 56 bytes: with a suffix, past PostgreSQL's 63
    dev.server.psql(f"DROP DATABASE IF EXISTS {long_name}; CREATE DATABASE {long_name};")
    config = write_config(tmp_path, prod, dev)
    config.write_text(config.read_text().replace("database: crm_development,", f"database: {long_name},"))
    for _ in range(2):
        done = sync(config, "--force")
        assert done.returncode == 0, done.stderr
    dev_ep = dev.endpoint(long_name)
    assert dev_ep.query("SELECT count(*) AS n FROM orders")[0]["n"] >= 20000
    names = {r["datname"] for r in dev.endpoint().query("SELECT datname FROM pg_database")}
    assert not any("__dbdeck_" in n for n in names)
    dev.server.psql(f"DROP DATABASE {long_name};")


def test_a_changed_large_object_is_not_taken_for_unchanged_prod(clusters, tmp_path):
    prod, dev = clusters
    prod_ep, dev_ep = prod.endpoint("crm_production"), dev.endpoint("crm_development")
    oid = prod_ep.query("SELECT lo_from_bytea(0, 'first contract') AS oid")[0]["oid"]
    config = write_config(tmp_path, prod, dev)
    try:
        done = sync(config, "--force")
        assert done.returncode == 0, done.stderr
        assert bytes(dev_ep.query(f"SELECT lo_get({oid}) AS b")[0]["b"]) == b"first contract"
        prod_ep.execute(f"SELECT lo_put({oid}, 0, 'FIRST')")
        done = sync(config)
        assert done.returncode == 0, done.stderr
        assert "nothing to do" not in done.stdout
        assert bytes(dev_ep.query(f"SELECT lo_get({oid}) AS b")[0]["b"]) == b"FIRST contract"
        again = sync(config)
        assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout + again.stderr
    finally:
        prod_ep.execute(f"SELECT lo_unlink({oid})")


def test_exclude_tables_naming_no_table_is_a_warning_every_run(clusters, tmp_path):
    prod, dev = clusters
    config = write_config(tmp_path, prod, dev, extra="  exclude_tables: [_prisma_migrations, custmers]\n")
    done = sync(config, "--force")
    assert done.returncode == 0, done.stderr
    assert "exclude_tables: custmers names no table in prod or dev" in done.stderr
    assert "_prisma_migrations names no table" not in done.stderr


@pytest.mark.parametrize("path", ["parallel", "one-stream", "dump-file"])
def test_a_frozen_prod_mid_copy_fails_after_stall_timeout(clusters, tmp_path, path):
    prod, dev = clusters
    prod_ep, dev_ep = prod.endpoint("crm_production"), dev.endpoint("crm_development")
    prod_ep.execute("CREATE TABLE IF NOT EXISTS bulk_frozen AS SELECT g AS id, repeat(md5(g::text), 8) AS payload "
                    "FROM generate_series(1, 400000) g")
    extra = "  stall_timeout: 3\n"
    large_object = None
    if path == "one-stream":  # large objects: the copy is one pg_dump | pg_restore stream
        large_object = prod_ep.query("SELECT lo_from_bytea(0, 'x') AS oid")[0]["oid"]
    if path == "dump-file":
        extra += f"  dump_dir: {tmp_path}/dumps\n"
    config = write_config(tmp_path, prod, dev, extra=extra)
    before = checksums(dev_ep)
    frozen = []
    try:
        process = subprocess.Popen([str(BIN / "sync-prod-to-dev"), "--config", str(config), "--force"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def copying_backends():
            return [r["pid"] for r in prod.endpoint().query(
                "SELECT pid FROM pg_stat_activity WHERE datname = 'crm_production' AND query ILIKE 'COPY %bulk_frozen%TO STDOUT%'")]
        assert wait_for(copying_backends, timeout=60, pause=0.02)
        for pid in copying_backends():  # the server stops answering mid-stream; TCP stays open
            os.kill(pid, signal.SIGSTOP)
            frozen.append(pid)
        started = time.monotonic()
        out, err = process.communicate(timeout=120)
        assert process.returncode == 1, err
        assert "from prod for" in err and "stall_timeout" in err, err
        assert time.monotonic() - started < 60
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        prod_ep.execute("DROP TABLE IF EXISTS bulk_frozen")
        if large_object is not None:
            prod_ep.execute(f"SELECT lo_unlink({large_object})")
    if path == "dump-file":
        assert not list((tmp_path / "dumps").glob("*.dump"))  # the stalled dump was not kept
    names = {r["datname"] for r in dev.endpoint().query("SELECT datname FROM pg_database")}
    assert not any("__dbdeck_" in n for n in names)
    assert checksums(dev_ep) == before


# Each is a change to prod that pg_dump carries to dev; none writes a row a counter would see.
PROD_CHANGES = [
    ("a column default", "ALTER TABLE items ALTER COLUMN label SET DEFAULT 'new'"),
    ("a renamed column", "ALTER TABLE items RENAME COLUMN label TO title"),
    ("NOT NULL", "ALTER TABLE items ALTER COLUMN title SET NOT NULL"),
    ("a dropped column", "ALTER TABLE items DROP COLUMN weight"),
    ("a comment", "COMMENT ON TABLE items IS 'the catalogue'"),
    ("an enum type", "CREATE TYPE mood AS ENUM ('calm')"),
    ("an enum value", "ALTER TYPE mood ADD VALUE 'busy'"),
    ("a domain", "CREATE DOMAIN positive AS int CHECK (VALUE > 0)"),
    ("a second trigger", "CREATE TRIGGER items_touched_again BEFORE UPDATE ON items FOR EACH ROW "
                         "EXECUTE FUNCTION touch()"),
    ("a validated constraint", "ALTER TABLE items VALIDATE CONSTRAINT items_id_check"),
    ("a policy", "CREATE POLICY own_items ON items USING (true)"),
]


def test_every_change_to_prod_or_dev_makes_the_next_sync_copy_and_nothing_else_does(workdir, tmp_path):
    prod = _start_postgres(workdir, "fingerprint-prod")
    dev = _start_postgres(workdir, "fingerprint-dev")
    try:
        prod.server.psql("CREATE DATABASE shop;")
        dev.server.psql("CREATE DATABASE shop_dev;")
        prod_ep, dev_ep = prod.endpoint("shop"), dev.endpoint("shop_dev")
        prod_ep.execute("CREATE TABLE items (id serial PRIMARY KEY, label text, weight int); "
                        "ALTER TABLE items ADD CONSTRAINT items_id_check CHECK (id > 0) NOT VALID; "
                        "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END'; "
                        "CREATE TRIGGER items_touched BEFORE INSERT ON items FOR EACH ROW EXECUTE FUNCTION touch(); "
                        "CREATE TABLE notes (id serial PRIMARY KEY, body text); "
                        "INSERT INTO items (label, weight) SELECT 'i' || g, g FROM generate_series(1, 50) g")
        config = write_config(tmp_path, prod, dev, extra="  exclude_tables: [notes]\n")
        text = config.read_text().replace("crm_production", "shop").replace("crm_development", "shop_dev")
        config.write_text(text)

        def copies(why):
            done = sync(config)
            assert done.returncode == 0, done.stdout + done.stderr
            assert "nothing to do" not in done.stdout, f"{why}: skipped\n{done.stdout}"
            return done.stdout

        def skips(why):
            done = sync(config)
            assert done.returncode == 0 and "nothing to do" in done.stdout, f"{why}: copied\n{done.stdout}"

        copies("first sync")
        skips("nothing changed")

        # the probe each run (and each quick answer) decides by, asked directly after each change
        def probe():
            return prod_ep.query("SELECT (" + PROD_PROBE + ") AS p")[0]["p"]

        for what, statement in PROD_CHANGES:
            before = probe()
            prod_ep.execute(statement)
            assert probe() != before, f"{what} left prod's fingerprint as it was"
        before = probe()
        for housekeeping in ("VACUUM ANALYZE items", "CREATE TEMP TABLE scratch (x int)"):
            prod_ep.execute(housekeeping)
        assert probe() == before, "VACUUM, ANALYZE or a temporary table were taken for a change"
        assert "prod changed" in copies("all of those changes")
        skips("nothing changed since the last change")
        assert dev_ep.query("SELECT obj_description('items'::regclass) AS c")[0]["c"] == "the catalogue"
        assert dev_ep.query("SELECT count(*) AS n FROM pg_policies WHERE policyname = 'own_items'")[0]["n"] == 1

        # a committed update, then a crash: the counters it moved are gone with the crash
        prod_ep.execute("UPDATE items SET title = 'after' WHERE id = 1")
        prod.server.stop("immediate")
        prod.server.start()
        copies("a crash after an update")
        assert dev_ep.query("SELECT title FROM items WHERE id = 1")[0]["title"] == "after"
        skips("nothing changed after the crash's copy")

        # dev's side: a developer's write, a developer's DDL, an older dump restored into dev in place
        dev_ep.execute("INSERT INTO items (title) VALUES ('a developer was here')")
        assert "shop_dev changed" in copies("a write to dev")
        assert dev_ep.query("SELECT count(*) AS n FROM items WHERE title = 'a developer was here'")[0]["n"] == 0
        dev_ep.execute("CREATE INDEX items_title ON items (title)")
        copies("DDL in dev")
        older = tmp_path / "older.dump"
        dev_ep.run_tool("pg_dump", "-Fc", "-f", str(older), read_only=True)
        prod_ep.execute("INSERT INTO items (title) VALUES ('newer')")
        copies("a write to prod")
        dev_ep.run_tool("pg_restore", "--clean", "--if-exists", "--no-owner", "-d", "shop_dev", str(older))
        assert dev_ep.query("SELECT count(*) AS n FROM items WHERE title = 'newer'")[0]["n"] == 0
        copies("an older dump restored into dev")
        assert dev_ep.query("SELECT count(*) AS n FROM items WHERE title = 'newer'")[0]["n"] == 1
        # dev keeps its own excluded tables (a serial one here: its sequence is dev's too): writing to one
        # changes nothing a sync would bring
        dev_ep.execute("INSERT INTO notes (body) VALUES ('kept across syncs')")
        skips("a write to an excluded table")
        dev.server.stop()
        dev.server.start()
        copies("a restart of dev's server")
        assert dev_ep.query("SELECT body FROM notes")[0]["body"] == "kept across syncs"
        skips("nothing changed at the end")
        # the excluded serial table through the dump-file path too
        config.write_text(config.read_text().replace("  exclude_tables: [notes]\n",
                                                      f"  exclude_tables: [notes]\n  dump_dir: {tmp_path}/dumps\n"))
        through_file = sync(config, "--force")
        assert through_file.returncode == 0, through_file.stdout + through_file.stderr
        assert dev_ep.query("SELECT body FROM notes")[0]["body"] == "kept across syncs"
    finally:
        prod.server.destroy()
        dev.server.destroy()
