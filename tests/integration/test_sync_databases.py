"""sync-databases against two real PostgreSQL clusters, as a non-superuser table owner."""

import json
import os
import random
import subprocess

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from tests.conftest import BIN, _start_postgres, new_password

# its tests share module-scoped servers and build on each other's state: one worker runs them all, in order
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("test_sync_databases")]

PERFIS = ("CREATE TABLE perfis (id int PRIMARY KEY, nome text, email text, "
          "updated_at timestamptz NOT NULL DEFAULT now())")
ODD = ('CREATE TABLE "Odd ""Q"" Table" (tenant text, id int, valor numeric, '
       'updated_at timestamp, PRIMARY KEY (tenant, id))')


@pytest.fixture(scope="module")
def clusters(workdir):
    started = [_start_postgres(workdir, "sdb-local"), _start_postgres(workdir, "sdb-external")]
    password = new_password()
    for cluster in started:
        with psycopg.connect(**connect_args(cluster, "postgres", "postgres", cluster.password), autocommit=True) as c:
            c.execute(psycopg.sql.SQL("CREATE ROLE app LOGIN PASSWORD {}").format(psycopg.sql.Literal(password)))
    yield started, password
    for cluster in started:
        cluster.server.destroy()


def connect_args(cluster, database, user, password):
    return {"host": "127.0.0.1", "port": cluster.port, "dbname": database, "user": user, "password": password}


class Pair:
    """One fresh database on each cluster, owned by the non-superuser `app`, with the tables."""

    counter = 0

    def __init__(self, clusters, tmp_path, extra_config=""):
        (local, external), password = clusters
        Pair.counter += 1
        self.database = f"crm{Pair.counter}"
        self.sides = {}
        for side, cluster in (("local", local), ("external", external)):
            with psycopg.connect(**connect_args(cluster, "postgres", "postgres", cluster.password),
                                 autocommit=True) as c:
                c.execute(f"CREATE DATABASE {self.database} OWNER app")
            args = connect_args(cluster, self.database, "app", password)
            with psycopg.connect(**args, autocommit=True) as c:
                c.execute(PERFIS)
                c.execute(ODD)
            self.sides[side] = args
        self.env = {"DATABASE_URL": make_conninfo(**self.sides["local"]),
                    "EXTERNAL_DB_URL": make_conninfo(**self.sides["external"])}
        self.config = tmp_path / "dbdeck.yaml"
        self.config.write_text(f"dbdeck:\n  state_dir: {tmp_path}/state\n  run_dir: {tmp_path}/run\n"
                               f"sync_databases:\n  tables:\n    - perfis\n"
                               f"    - {{name: 'Odd \"Q\" Table', key: [tenant, id]}}\n{extra_config}")
        self.tmp_path = tmp_path

    def sync(self, *args, env=None):
        return subprocess.run([str(BIN / "sync-databases"), "--config", str(self.config), *args],
                              capture_output=True, text=True, timeout=120, cwd=self.tmp_path,
                              env={**os.environ, **self.env, **(env or {})})

    def sql(self, side, statement, params=None):
        with psycopg.connect(**self.sides[side], autocommit=True) as c:
            cursor = c.execute(statement, params)
            return cursor.fetchall() if cursor.description else None

    def rows(self, side, table="perfis"):
        return self.sql(side, f"SELECT * FROM {table} ORDER BY 1, 2")

    def round(self, **kwargs):
        done = self.sync("run", **kwargs)
        assert done.returncode == 0, done.stderr
        return done


@pytest.fixture
def pair(clusters, tmp_path):
    made = Pair(clusters, tmp_path)
    done = made.sync("setup")
    assert done.returncode == 0, done.stderr
    return made


def test_setup_dry_run_then_idempotent_as_table_owner(clusters, tmp_path):
    fresh = Pair(clusters, tmp_path)
    dry = fresh.sync("setup", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "CREATE TABLE IF NOT EXISTS" in dry.stdout and "perfis_changelog" in dry.stdout
    assert fresh.sql("local", "SELECT to_regclass('perfis_changelog')") == [(None,)]
    for _ in range(2):
        done = fresh.sync("setup")
        assert done.returncode == 0, done.stderr
    for side in ("local", "external"):
        assert fresh.sql(side, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user") == [(False,)]
        triggers = fresh.sql(side, "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal")
        assert triggers == [(4,)]  # touch + capture, on each of the two tables
    checked = fresh.sync("test-connection")
    assert checked.returncode == 0 and checked.stdout.count("capture triggers present") == 4


def test_changes_propagate_both_ways_without_echo(pair):
    pair.sql("local", "INSERT INTO perfis (id, nome) VALUES (1, 'Ana'), (2, 'Bia')")
    pair.sql("external", "INSERT INTO perfis (id, nome) VALUES (3, 'Caio')")
    pair.sql("external", """INSERT INTO "Odd ""Q"" Table" VALUES ('t1', 1, 9.5, '2026-01-01 10:00')""")
    pair.round()
    assert pair.rows("local") == pair.rows("external") and len(pair.rows("local")) == 3
    assert pair.rows("local", '"Odd ""Q"" Table"') == pair.rows("external", '"Odd ""Q"" Table"')
    # applied rows were not captured again: nothing pending on either side
    for side in ("local", "external"):
        assert pair.sql(side, "SELECT count(*) FROM perfis_changelog WHERE NOT synced") == [(0,)]

    pair.sql("external", "UPDATE perfis SET nome = 'Ana Maria' WHERE id = 1")
    pair.sql("local", "DELETE FROM perfis WHERE id = 3")
    pair.round()
    assert pair.rows("local") == pair.rows("external")
    assert [r[:2] for r in pair.rows("local")] == [(1, "Ana Maria"), (2, "Bia")]
    again = pair.round()
    assert "0 change(s) read" in again.stdout and "1 change(s) read" not in again.stdout


def test_conflicts_resolve_the_same_way_on_both_sides(pair):
    pair.sql("local", "INSERT INTO perfis (id, nome) VALUES (10, 'base'), (11, 'base'), (12, 'base')")
    pair.round()
    # 10: both update, external later -> external wins everywhere
    pair.sql("local", "UPDATE perfis SET nome = 'local', updated_at = '2030-01-01 10:00+00' WHERE id = 10")
    pair.sql("external", "UPDATE perfis SET nome = 'external', updated_at = '2030-01-01 11:00+00' WHERE id = 10")
    # 11: same timestamp on both sides -> the deterministic tie-break picks one, the same one on both
    pair.sql("local", "UPDATE perfis SET nome = 'tie-l', updated_at = '2030-01-01 12:00+00' WHERE id = 11")
    pair.sql("external", "UPDATE perfis SET nome = 'tie-e', updated_at = '2030-01-01 12:00+00' WHERE id = 11")
    # 12: deleted locally now, updated externally with a later timestamp -> the update wins, row returns
    pair.sql("local", "DELETE FROM perfis WHERE id = 12")
    pair.sql("external", "UPDATE perfis SET nome = 'survives', updated_at = '2099-01-01 00:00+00' WHERE id = 12")
    done = pair.round(env=None)
    assert "conflict" in done.stdout
    pair.round()
    local, external = pair.rows("local"), pair.rows("external")
    assert local == external
    names = {row[0]: row[1] for row in local}
    assert names[10] == "external" and names[11] in ("tie-l", "tie-e") and names[12] == "survives"
    status = pair.sync("status", "--format", "json")
    assert json.loads(status.stdout)["conflicts_total"] >= 3


def test_late_commit_with_smaller_changelog_id_is_not_lost(pair):
    with psycopg.connect(**pair.sides["local"]) as slow:
        slow.execute("INSERT INTO perfis (id, nome) VALUES (20, 'slow')")  # takes a changelog id, uncommitted
        pair.sql("local", "INSERT INTO perfis (id, nome) VALUES (21, 'fast')")  # larger id, committed first
        pair.round()
        assert [r[0] for r in pair.rows("external")] == [21]
        slow.commit()
    pair.round()
    assert [r[0] for r in pair.rows("external")] == [20, 21]


def test_batches_are_bounded(clusters, tmp_path):
    small = Pair(clusters, tmp_path, extra_config="  batch_size: 50\n")
    assert small.sync("setup").returncode == 0
    small.sql("local", "INSERT INTO perfis (id, nome) SELECT g, 'n' || g FROM generate_series(1, 520) g")
    done = small.sync("run", "--format", "json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    counts = result["directions"]["local->external:perfis"]
    assert counts["read"] == 520 and counts["batches"] == 11
    assert small.rows("local") == small.rows("external")


def test_randomized_operations_with_crashes_between_apply_and_acknowledge(pair):
    rng = random.Random(20261123)
    next_id = 1000
    crashes = 0
    for step in range(12):
        for _ in range(25):
            side = rng.choice(["local", "external"])
            existing = [r[0] for r in pair.sql(side, "SELECT id FROM perfis")]
            action = rng.random()
            if action < 0.55 or not existing:
                next_id += 1
                pair.sql(side, "INSERT INTO perfis (id, nome) VALUES (%s, %s) ON CONFLICT (id) DO NOTHING",
                         (rng.choice([next_id, *existing[:3]]), f"{side}-{step}"))
            elif action < 0.85:
                pair.sql(side, "UPDATE perfis SET nome = %s WHERE id = %s", (f"{side}-upd-{step}", rng.choice(existing)))
            else:
                pair.sql(side, "DELETE FROM perfis WHERE id = %s", (rng.choice(existing),))
        if step % 3 == 1:
            crashed = pair.sync("run", env={"DBDECK_FAILPOINT": "sync-databases:after-apply"})
            assert crashed.returncode == 137, crashed.stderr
            crashes += 1
        else:
            pair.round()
    pair.round()
    pair.round()
    assert crashes == 4
    local, external = pair.rows("local"), pair.rows("external")
    assert local == external and len(local) >= 10
    for side in ("local", "external"):
        assert pair.sql(side, "SELECT count(*) FROM perfis_changelog WHERE NOT synced") == [(0,)]


def test_status_test_connection_and_bad_config(pair, tmp_path):
    pair.sql("local", "INSERT INTO perfis (id, nome) VALUES (30, 'pending')")
    status = pair.sync("status")
    assert "local: perfis: 1 pending change(s)" in status.stdout and "last successful round: never" in status.stdout

    pooled = pair.sync("test-connection", env={
        "EXTERNAL_DB_URL": "postgresql://app:secret-pw@ep-cool-1234-pooler.invalid/crm?connect_timeout=2"})
    assert pooled.returncode == 1
    assert "pooled (-pooler) host" in pooled.stdout and "external: FAILED" in pooled.stdout
    assert "secret-pw" not in pooled.stdout + pooled.stderr

    pair.config.write_text(pair.config.read_text().replace("    - perfis\n", "    - {name: perfis, timestamp: modified}\n"))
    pair.sql("external", "DROP TRIGGER perfis_sync_capture ON perfis")
    bad = pair.sync("setup")
    assert bad.returncode == 2 and "no column modified" in bad.stderr
    # nothing changed on either side: the dropped trigger was not recreated
    assert pair.sql("external", "SELECT count(*) FROM pg_trigger WHERE tgname = 'perfis_sync_capture'") == [(0,)]


def test_external_url_read_from_env_sync_file_as_in_the_seed(pair):
    quoted = pair.env["EXTERNAL_DB_URL"].replace("\\", "\\\\").replace('"', '\\"')
    (pair.tmp_path / ".env.sync").write_text(f'EXTERNAL_DB_URL="{quoted}"\n')
    pair.sql("local", "INSERT INTO perfis (id, nome) VALUES (40, 'via env file')")
    env = {k: v for k, v in os.environ.items() if k != "EXTERNAL_DB_URL"}
    done = subprocess.run([str(BIN / "sync-databases"), "--config", str(pair.config), "run"], capture_output=True,
                          text=True, timeout=120, cwd=pair.tmp_path,
                          env={**env, "DATABASE_URL": pair.env["DATABASE_URL"]})
    assert done.returncode == 0, done.stderr
    assert [r[:2] for r in pair.rows("external")] == [(40, "via env file")]


def test_a_target_table_locked_by_another_session_fails_the_run_after_lock_timeout(pair):
    """A long ALTER or LOCK TABLE on the target used to block the run without limit (and the 5-minute
    job behind it); with `lock_timeout` the run fails saying so, and the next one catches up."""
    pair.config.write_text(pair.config.read_text() + "  external: {lock_timeout: 2}\n")
    pair.sql("local", "INSERT INTO perfis (id, nome, email) VALUES (1, 'Ana', 'ana@example.com')")
    holder = psycopg.connect(**pair.sides["external"])
    holder.execute("LOCK TABLE perfis IN ACCESS EXCLUSIVE MODE")
    try:
        done = pair.sync("run")
        assert done.returncode == 1, done.stdout + done.stderr
        assert "lock timeout" in done.stderr.lower() and len(done.stderr.strip().splitlines()) <= 3, done.stderr
    finally:
        holder.rollback()
        holder.close()
    pair.round()
    assert [r[:3] for r in pair.rows("external")] == [(1, "Ana", "ana@example.com")]
