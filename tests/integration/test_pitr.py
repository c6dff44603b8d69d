"""Backups and point-in-time recovery with Barman (Debian's package) on a pair built the README's way
(stock PostgreSQL + setup-master + rebuild-replica), and the replication password's rotation.

Every restore is started and its rows counted: a restore that only exits 0 proves nothing."""

import json
import os
import shutil
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest
import yaml

from dbdeck.plugins.replication.nodes import files_in_use

from ..conftest import require, wait_for
from .test_failover import _safe

pytestmark = pytest.mark.integration


@pytest.fixture
def pitr_pair(local_pair):
    require("barman", "barman")
    pair = local_pair
    config = yaml.safe_load(pair.config.read_text())
    config["replication"]["backup"] = {
        "home": str(pair.base / "barman"),
        "retention_policy": "RECOVERY WINDOW OF 7 DAYS",
        "checks": [{"database": "postgres", "query": "SELECT count(*) FROM keep", "min": 100}],
    }
    pair.config.write_text(yaml.safe_dump(config))
    pair.barman_home = pair.base / "barman"
    yield pair
    subprocess.run(["pkill", "-f", f"directory={pair.barman_home}"], check=False)


def _dbdeck(pair, *args, timeout=300):
    return pair.run("dbdeck", *args, timeout=timeout)


def _json(result):
    assert result.stdout.strip(), result.stderr
    return json.loads(result.stdout)


def _now(pair, port):
    return pair.sql(port, "SELECT clock_timestamp()")[0][0].isoformat()


class Restored:
    """A restored data directory started on its own port, as the restore's closing line says."""

    def __init__(self, pair, directory):
        from dbdeck.plugins.sandbox.servers import free_port

        self.pair, self.directory, self.port = pair, Path(directory), free_port()
        self.socket_dir = Path(f"{directory}.run")

    def __enter__(self):
        self.socket_dir.mkdir(mode=0o700)
        shutil.chown(self.socket_dir, "postgres")
        pg_ctl = Path(self.pair.primary.server.bindir) / "pg_ctl"
        started = subprocess.run(["runuser", "-u", "postgres", "--", str(pg_ctl), "-D", str(self.directory), "-l",
                                  f"{self.socket_dir}/log", "-o", f"-p {self.port} -k {self.socket_dir}", "-w",
                                  "start"], capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr + (self.socket_dir / "log").read_text()
        assert wait_for(lambda: _safe(lambda: not self.sql("SELECT pg_is_in_recovery()")[0][0]), timeout=60), \
            (self.socket_dir / "log").read_text()
        return self

    def sql(self, statement):
        return self.pair.sql(self.port, statement)

    def __exit__(self, *exc):
        pg_ctl = Path(self.pair.primary.server.bindir) / "pg_ctl"
        subprocess.run(["runuser", "-u", "postgres", "--", str(pg_ctl), "-D", str(self.directory), "-m", "immediate",
                        "stop"], capture_output=True, timeout=60)


def _tables(restored):
    return {r[0] for r in restored.sql("SELECT relname FROM pg_class WHERE relkind = 'r' AND relnamespace = "
                                       "'public'::regnamespace")}


@pytest.mark.timeout(600)  # the longest test: a Barman set-up, three restores and two verifications
def test_backup_restore_to_a_time_verify_and_bad_input(pitr_pair):
    pair = pitr_pair
    dry = _dbdeck(pair, "pitr", "setup", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "GRANT EXECUTE ON FUNCTION pg_backup_start" in dry.stdout + dry.stderr
    assert not pair.barman_home.exists(), "a dry run writes nothing"
    assert pair.sql(pair.alpha_port, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'barman'") == [(0,)]

    setup = _dbdeck(pair, "pitr", "setup", "--format", "json")
    assert setup.returncode == 0, setup.stdout + setup.stderr
    report = _json(setup)
    assert report["ok"] and report["checks"]["receive_wal_running"]["ok"], report
    assert oct((pair.barman_home / "pgpass").stat().st_mode & 0o777) == "0o600"
    password = pair.password_file.read_text().strip()
    for path in pair.barman_home.glob("barman.d/*.conf"):
        assert password not in path.read_text()
    again = _dbdeck(pair, "pitr", "setup", "--format", "json")  # idempotent: no second first backup
    assert again.returncode == 0, again.stdout + again.stderr
    listed = _json(_dbdeck(pair, "pitr", "list", "--format", "json"))
    assert len(listed["backups"]) == 1 and listed["backups"][0]["status"] == "DONE"
    assert isinstance(listed["backups"][0]["size_bytes"], int) and listed["backups"][0]["size_bytes"] > 1_000_000
    text = _dbdeck(pair, "pitr", "list")
    assert "BACKUP" in text.stdout and "SIZE" in text.stdout and " MB" in text.stdout, text.stdout
    # no restore verified yet: status says so rather than "ok"
    status = _json(pair.run("dbdeck", "status", "--format", "json"))
    never = {row["name"]: row for row in status if row["kind"] == "backup"}["pitr-verify"]
    assert never["state"] == "never" and "no restore verified yet" in never["detail"], never

    pair.sql(pair.alpha_port, "CREATE TABLE keep (id int PRIMARY KEY); INSERT INTO keep SELECT generate_series(1, 100)")
    pair.sql(pair.alpha_port, "CREATE TABLE dropped (id int); INSERT INTO dropped VALUES (1)")
    time.sleep(1.2)
    moment = _now(pair, pair.alpha_port)
    # the segment around T ends with no commit after T in it (a bulk load or CREATE DATABASE does that too):
    # Barman alone copies WAL only through it, and PostgreSQL stops short of the target
    pair.sql(pair.alpha_port, "SELECT pg_switch_wal()")
    time.sleep(1.2)
    pair.sql(pair.alpha_port, "INSERT INTO keep SELECT generate_series(101, 150)")
    pair.sql(pair.alpha_port, "DROP TABLE dropped")

    target = pair.base / "restored"
    dry = _dbdeck(pair, "pitr", "restore", "--to-time", moment, "--target", target, "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "barman" in dry.stdout and "recover" in dry.stdout and not target.exists()

    restored = _dbdeck(pair, "pitr", "restore", "--to-time", moment, "--target", target, "--format", "json")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert _json(restored)["target"] == str(target)
    assert "added WAL through" in restored.stderr, restored.stderr
    with Restored(pair, target) as copy:
        assert copy.sql("SELECT count(*), max(id) FROM keep") == [(100, 100)], "rows up to T, none after"
        assert "dropped" in _tables(copy), "the DROP after T is not replayed"
        assert copy.sql("SHOW synchronous_standby_names") == [("",)]

    # bad input: refused, nothing changed
    before = sorted(p.name for p in pair.base.iterdir())
    early = _dbdeck(pair, "pitr", "restore", "--to-time", "2001-01-01T00:00:00+00:00", "--target",
                    pair.base / "never")
    assert early.returncode != 0 and "before the oldest restorable moment" in early.stderr, early.stderr
    future = _dbdeck(pair, "pitr", "restore", "--to-time", "2999-01-01T00:00:00+00:00", "--target",
                     pair.base / "never")
    assert future.returncode != 0 and "in the future" in future.stderr, future.stderr
    in_use = _dbdeck(pair, "pitr", "restore", "--latest", "--target", target)
    assert in_use.returncode != 0 and "is not empty" in in_use.stderr, in_use.stderr
    a_file = pair.base / "a-file"
    a_file.write_text("not a data directory\n")
    not_a_directory = _dbdeck(pair, "pitr", "restore", "--latest", "--target", a_file)
    assert not_a_directory.returncode == 2 and "is a file, not a directory" in not_a_directory.stderr, \
        not_a_directory.stderr
    a_file.unlink()
    running = _dbdeck(pair, "pitr", "restore", "--latest", "--target", "beta")
    assert running.returncode != 0 and "beta is running" in running.stderr, running.stderr
    neither = _dbdeck(pair, "pitr", "restore", "--target", pair.base / "never")
    assert neither.returncode == 2 and "exactly one of --to-time" in neither.stderr, neither.stderr
    assert sorted(p.name for p in pair.base.iterdir()) == before
    assert pair.sql(pair.alpha_port, "SELECT count(*) FROM keep") == [(150,)]

    # into a stopped node, through its driver: its files are kept aside inside its data directory
    pair.standby_server.stop()
    beta_before = sorted(p.name for p in pair.standby_server.datadir.iterdir())
    # killed with -9 between the data files and global/pg_control: what is left cannot start at all
    killed = pair.run("dbdeck", "pitr", "restore", "--latest", "--target", "beta", "--yes",
                      env={"DBDECK_FAILPOINT": "restore.files-extracted"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert (pair.standby_server.datadir / "PG_VERSION").exists()
    assert not (pair.standby_server.datadir / "global" / "pg_control").exists()
    with pytest.raises(Exception):
        pair.standby_server.start()
    assert not pair.standby_server.is_running()
    leftovers = sorted(pair.barman_home.glob("restore-beta-*"))
    assert leftovers and all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in leftovers), \
        [(p.name, oct(p.stat().st_mode)) for p in leftovers]
    into_node = _dbdeck(pair, "pitr", "restore", "--latest", "--target", "beta", "--yes", "--format", "json")
    assert into_node.returncode == 0, into_node.stdout + into_node.stderr
    assert "left by an interrupted restore" in into_node.stderr + into_node.stdout
    assert not list(pair.barman_home.glob("restore-beta-*")), "the interrupted restore's copies stay behind"
    kept = pair.standby_server.datadir / _json(into_node)["kept_aside"]
    assert kept.is_dir()  # what the killed run left
    # beta's files from before, as the killed run kept them aside
    first = [d for d in pair.standby_server.datadir.iterdir() if d.name.startswith(".dbdeck-before-restore-")
             and d != kept]
    assert len(first) == 1 and sorted(p.name for p in first[0].iterdir()) == beta_before
    # restored into a node that is not the primary, the copy stays read-only: never a second primary
    assert (pair.standby_server.datadir / "standby.signal").exists()
    pair.standby_server.start()
    assert wait_for(lambda: _safe(lambda: pair.sql(pair.beta_port, "SELECT count(*) FROM keep") == [(150,)]),
                    timeout=60), "--latest: every row"
    assert pair.sql(pair.beta_port, "SELECT pg_is_in_recovery()") == [(True,)]
    assert "dropped" not in {r[0] for r in pair.sql(pair.beta_port, "SELECT relname FROM pg_class")}
    code, report, _ = pair.check()
    assert report["primary"] == "alpha" and not any("SPLIT-BRAIN" in p for p in report["problems"]), report
    pair.standby_server.stop()  # beta was a restored, stand-alone copy
    primary = _dbdeck(pair, "pitr", "restore", "--latest", "--target", "alpha", "--yes")
    assert primary.returncode != 0 and "alpha is running" in primary.stderr, primary.stderr

    # a verify killed with its throwaway copy running: the next one stops and removes it, and says so
    killed = pair.run("dbdeck", "pitr", "verify", env={"DBDECK_FAILPOINT": "verify.started"}, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    left = [d for d in (pair.barman_home / "verify").iterdir()]
    assert len(left) == 1 and (left[0] / "postmaster.pid").exists(), left
    verified = _dbdeck(pair, "pitr", "verify", "--format", "json", timeout=600)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"removed {left[0]}, a throwaway copy an interrupted verify left" in verified.stderr, verified.stderr
    assert not files_in_use(left[0]), "the killed verify's server runs on"
    result = _json(verified)
    assert [s.get("label") for s in result["steps"][1:]] == ["latest", "point in time"], result
    assert result["steps"][1]["checks"][0]["value"] == 150
    assert not list((pair.barman_home / "verify").iterdir()), "throwaway clusters are removed"
    status = _json(pair.run("dbdeck", "status", "--format", "json"))
    rows = {row["name"]: row for row in status if row["kind"] == "backup"}
    assert rows["pitr-verify"]["state"] == "ok" and rows["pitr-backup"]["state"] == "ok", rows
    assert rows["pitr-verify"]["metrics"]["dbdeck_backup_last_verified_timestamp_seconds"] > time.time() - 600
    # a PGPASSWORD in the caller's environment does not override Barman's pgpass (issue 29.3)
    check = pair.run("dbdeck", "pitr", "check", env={"PGPASSWORD": "not-the-password"})
    assert check.returncode == 0, check.stdout + check.stderr

    # the primary lost: refused over it unless told, then restored with what Barman received last
    pair.sql(pair.alpha_port, "INSERT INTO keep VALUES (151)")
    pair.primary.server.stop(mode="immediate")
    alpha_before = sorted(p.name for p in Path(pair.primary.server.datadir).iterdir())
    refused = _dbdeck(pair, "pitr", "restore", "--latest", "--target", "alpha", "--yes")
    assert refused.returncode != 0 and "alpha is the primary" in refused.stderr, refused.stderr
    assert sorted(p.name for p in Path(pair.primary.server.datadir).iterdir()) == alpha_before
    allowed = _dbdeck(pair, "pitr", "restore", "--latest", "--target", "alpha", "--allow-primary", "--yes")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "unfinished WAL segment" in allowed.stdout, allowed.stdout
    pair.primary.server.start()
    assert wait_for(lambda: _safe(lambda: pair.sql(pair.alpha_port, "SELECT NOT pg_is_in_recovery()")[0][0]),
                    timeout=60)
    assert pair.sql(pair.alpha_port, "SELECT count(*) FROM keep") == [(151,)], "nothing Barman received is lost"
    maintained = _dbdeck(pair, "pitr", "maintain", "--format", "json")
    assert maintained.returncode == 0, maintained.stdout + maintained.stderr
    assert not [p for p in _json(maintained)["problems"] if "hole" in p], maintained.stdout
    assert len(_json(_dbdeck(pair, "pitr", "list", "--format", "json"))["backups"]) == 2

    # a damaged backup file fails verification, in one line, and the status says so
    backup_id = _json(_dbdeck(pair, "pitr", "list", "--format", "json"))["backups"][0]["backup_id"]
    relation = pair.sql(pair.alpha_port, "SELECT pg_relation_filepath('keep')")[0][0]
    damaged = pair.barman_home / "data" / "pair" / "base" / backup_id / "data" / relation
    assert damaged.exists(), "the newest backup was taken after keep existed"
    with open(damaged, "r+b") as handle:
        handle.seek(100)
        handle.write(b"\xff" * 64)
    failed = _dbdeck(pair, "pitr", "verify", timeout=600)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "does not match its manifest" in failed.stderr, failed.stderr
    assert "Traceback" not in failed.stderr
    status = _json(pair.run("dbdeck", "status", "--format", "json"))
    rows = {row["name"]: row for row in status if row["kind"] == "backup"}
    assert rows["pitr-verify"]["state"] == "stale" and "failed" in rows["pitr-verify"]["detail"], rows


def test_backups_follow_a_switchover_and_restore_past_it(pitr_pair):
    pair = pitr_pair
    assert _dbdeck(pair, "pitr", "setup").returncode == 0
    pair.sql(pair.alpha_port, "CREATE TABLE keep (id int PRIMARY KEY); INSERT INTO keep SELECT generate_series(1, 10)")
    switched = pair.run("switchover", "--yes")
    assert switched.returncode == 0, switched.stdout + switched.stderr
    assert "backups follow the new primary" in switched.stdout + switched.stderr
    status = _json(pair.run("dbdeck", "status", "--format", "json"))
    wal = next(r for r in status if r["name"] == "pitr-wal")
    assert wal["state"] == "failing" and "hole" in wal["detail"], wal
    assert wal["metrics"]["dbdeck_backup_wal_chain_complete"] == 0

    pair.sql(pair.beta_port, "INSERT INTO keep SELECT generate_series(11, 20)")
    time.sleep(1.2)
    moment = _now(pair, pair.beta_port)
    time.sleep(1.2)
    pair.sql(pair.beta_port, "INSERT INTO keep SELECT generate_series(21, 30)")

    # the installed job, verbatim, as cron runs it: Barman's maintenance takes the base backup now due
    cron_file = pair.base / "cron.d" / "dbdeck"
    config = yaml.safe_load(pair.config.read_text())
    config["scheduler"] = {"backend": "cron", "cron_file": str(cron_file)}
    pair.config.write_text(yaml.safe_dump(config))
    installed = _dbdeck(pair, "schedule", "install")
    assert installed.returncode == 0, installed.stdout + installed.stderr
    line = [entry for entry in cron_file.read_text().splitlines() if entry.endswith("# dbdeck:job=pitr-maintain")][0]
    assert line.startswith("* * * * * root ")
    command = line.split(None, 6)[6]
    cron_ran = subprocess.run(["/bin/sh", "-c", command], env={"HOME": "/root", "LOGNAME": "root", "SHELL": "/bin/sh",
                                                              "PATH": "/usr/bin:/bin"}, cwd="/", capture_output=True,
                              text=True, timeout=300)
    assert cron_ran.returncode == 0 and cron_ran.stdout == cron_ran.stderr == "", cron_ran.stderr
    status = _json(pair.run("dbdeck", "status", "--format", "json"))
    wal = next(r for r in status if r["name"] == "pitr-wal")
    assert wal["state"] == "ok" and wal["metrics"]["dbdeck_backup_wal_chain_complete"] == 1, wal
    listed = _json(_dbdeck(pair, "pitr", "list", "--format", "json"))
    assert len(listed["backups"]) == 2 and listed["backups"][0]["timeline"] == 2, listed
    assert "127.0.0.1" in (pair.barman_home / "barman.d" / "pair.conf").read_text()
    assert f"port={pair.beta_port}" in (pair.barman_home / "barman.d" / "pair.conf").read_text()

    # a point after the failover but before the new base backup: the WAL chain across the switch restores it
    target = pair.base / "after-switch"
    restored = _dbdeck(pair, "pitr", "restore", "--to-time", moment, "--target", target)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    with Restored(pair, target) as copy:
        assert copy.sql("SELECT count(*) FROM keep") == [(20,)]


def test_rotate_the_replication_password_under_a_writer(pitr_pair):
    pair = pitr_pair
    assert _dbdeck(pair, "pitr", "setup").returncode == 0
    pair.sql(pair.alpha_port, "CREATE TABLE acks (id int PRIMARY KEY)")
    old = pair.password_file.read_text().strip()
    dry = pair.run("rotate-replication-password", "--dry-run")
    assert dry.returncode == 0 and pair.password_file.read_text().strip() == old, dry.stdout + dry.stderr

    # a step fails after the standby took the new secret: the old one is put back everywhere
    failed = pair.run("rotate-replication-password", env={"DBDECK_FAILPOINT": "rotate.standbys-changed:error"})
    assert failed.returncode == 1 and "putting the old password back everywhere" in failed.stderr, failed.stderr
    assert pair.password_file.read_text().strip() == old
    psycopg.connect(host="127.0.0.1", port=pair.alpha_port, user="replicator", password=old, dbname="postgres").close()
    assert wait_for(lambda: _safe(lambda: pair.sql(pair.alpha_port, "SELECT count(*) FROM pg_stat_replication WHERE "
                                                   "application_name = 'beta' AND state = 'streaming'")) == [(1,)],
                    timeout=30)
    assert old in (pair.barman_home / "pgpass").read_text()

    written, stop = [], threading.Event()

    def writer():
        with psycopg.connect(host="127.0.0.1", port=pair.alpha_port, user="postgres", password=pair.primary.password,
                             dbname="postgres", autocommit=True) as conn:
            n = 0
            while not stop.is_set():
                n += 1
                conn.execute("INSERT INTO acks VALUES (%s)", (n,))
                written.append(n)
                time.sleep(0.005)

    gaps, watching = [], threading.Event()

    def watch():
        down_since = None
        while not watching.is_set():
            streaming = _safe(lambda: pair.sql(pair.alpha_port, "SELECT count(*) FROM pg_stat_replication WHERE "
                                                                "application_name = 'beta' AND state = 'streaming'"))
            if streaming == [(1,)]:
                if down_since is not None:
                    gaps.append(time.monotonic() - down_since)
                down_since = None
            elif down_since is None:
                down_since = time.monotonic()
            time.sleep(0.02)

    threads = [threading.Thread(target=writer, daemon=True), threading.Thread(target=watch, daemon=True)]
    for thread in threads:
        thread.start()
    rotated = pair.run("rotate-replication-password", "--format", "json")
    time.sleep(0.5)
    stop.set()
    watching.set()
    for thread in threads:
        thread.join(10)
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    new = pair.password_file.read_text().strip()
    assert new != old and oct(pair.password_file.stat().st_mode & 0o777) == "0o600"
    assert _json(rotated)["streaming"] == ["beta"] and _json(rotated)["barman"] is True
    for text in (rotated.stdout, rotated.stderr, *(p.read_text() for p in pair.log_dir.glob("*.log"))):
        assert new not in text and old not in text
    assert new not in pair.primary.server.log_path.read_text()
    # the standby's secret is in its passfile: not in the conninfo its log prints on reload, not in its
    # postgresql.auto.conf (which base backups copy)
    for text in (pair.standby_server.log_path.read_text(), (pair.standby_server.datadir / "postgresql.auto.conf").read_text(),
                 pair.sql(pair.beta_port, "SHOW primary_conninfo")[0][0]):
        assert new not in text and old not in text
    assert max(gaps, default=0) < 10, gaps  # one reconnect, not an outage
    assert written, "the writer wrote"
    lsn = pair.sql(pair.alpha_port, "SELECT pg_current_wal_lsn()::text")[0][0]
    assert wait_for(lambda: _safe(lambda: pair.sql(pair.beta_port,
                                                   f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'")[0][0]), timeout=30)
    assert pair.sql(pair.beta_port, "SELECT count(*) FROM acks") == [(len(written),)], "nothing lost"
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host="127.0.0.1", port=pair.alpha_port, user="replicator", password=old, dbname="postgres")
    psycopg.connect(host="127.0.0.1", port=pair.alpha_port, user="replicator", password=new, dbname="postgres").close()
    assert new in (pair.barman_home / "pgpass").read_text()
    check = _dbdeck(pair, "pitr", "check", "--format", "json")
    assert _json(check)["checks"]["receive_wal_running"]["ok"], check.stdout
    assert os.environ.get("PGPASSWORD") != new

    # killed right after the role took a new secret: the standby and Barman still have the one before, and
    # stream on their open connections until they next reconnect
    killed = pair.run("rotate-replication-password", env={"DBDECK_FAILPOINT": "rotate.role-altered"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    half = pair.password_file.read_text().strip()
    assert half != new
    checked = pair.run("check-replication")
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "did not finish" in checked.stdout and "beta: the replication password" in checked.stdout, checked.stdout
    assert "Barman's WAL receiver: the replication password" in checked.stdout, checked.stdout
    assert half not in checked.stdout + checked.stderr and new not in checked.stdout + checked.stderr
    # beta reconnects, with the secret the role no longer has: it stops streaming (a plain rotation is refused
    # now); the next rotation finishes the interrupted one first
    pair.sql(pair.alpha_port, "SELECT pg_terminate_backend(pid) FROM pg_stat_replication WHERE application_name = 'beta'")
    assert wait_for(lambda: "password authentication failed" in pair.standby_server.log_path.read_text(), timeout=30)
    again = pair.run("rotate-replication-password")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "did not finish: putting the password in" in again.stderr, again.stderr
    latest = pair.password_file.read_text().strip()
    assert latest not in (new, half)
    assert wait_for(lambda: pair.run("check-replication").returncode == 0, timeout=30), pair.check()
    psycopg.connect(host="127.0.0.1", port=pair.alpha_port, user="replicator", password=latest,
                    dbname="postgres").close()
