"""Replication as a user sets it up (PostgreSQL's defaults + the README's setup-master --apply-settings):
pg_rewind that works at wal_keep_size 0, synchronous replication that survives every role change, the
fence that holds when dbdeck is killed at any step, and operators never locked out by the monitor."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from dbdeck.plugins.replication.nodes import files_in_use

from ..conftest import wait_for
from .test_failover import (Writer, _freeze, _ids, _postmaster_pid, _recovery, _safe, _start_monitor,
                            _stop_monitor, _with_config)

pytestmark = pytest.mark.integration


def _diverge_after_a_segment_switch(pair):
    """alpha (primary): a table that will not change, a checkpoint, then > 2 WAL segments that beta
    receives; beta is promoted; alpha writes more on its own (divergent). The last common checkpoint
    is now segments behind what the slot keeps on alpha."""
    pair.sql(pair.alpha_port, "CREATE TABLE unchanged AS SELECT g AS id, repeat('u', 200) AS pad "
                              "FROM generate_series(1, 20000) g")
    pair.sql(pair.alpha_port, "CREATE TABLE acks (id int PRIMARY KEY)")
    pair.sql(pair.alpha_port, "INSERT INTO acks VALUES (1)")
    pair.sql(pair.alpha_port, "CHECKPOINT")
    pair.sql(pair.alpha_port, "CREATE TABLE filler AS SELECT g, repeat('x', 1000) AS pad "
                              "FROM generate_series(1, 40000) g")
    lsn = pair.sql(pair.alpha_port, "SELECT pg_current_wal_lsn()::text")[0][0]
    assert wait_for(lambda: _safe(lambda: pair.sql(
        pair.beta_port, f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn")[0][0]), timeout=60)
    pair.sql(pair.beta_port, "SELECT pg_promote()")
    assert wait_for(lambda: _recovery(pair, pair.beta_port) is False, timeout=20)
    pair.sql(pair.alpha_port, "INSERT INTO acks SELECT generate_series(1000, 1100)")  # only on alpha
    pair.sql(pair.beta_port, "INSERT INTO acks VALUES (2)")
    path = pair.sql(pair.alpha_port, "SELECT pg_relation_filepath('unchanged')")[0][0]
    return Path(pair.primary.server.datadir, path)


def test_rejoin_uses_pg_rewind_at_wal_keep_size_0_and_keeps_unchanged_files(local_pair):
    pair = local_pair
    relation = _diverge_after_a_segment_switch(pair)
    inode = relation.stat().st_ino
    rejoined = pair.run("rebuild-replica", "--rejoin", "--node", "alpha")
    assert rejoined.returncode == 0, rejoined.stdout + rejoined.stderr
    assert "rejoined as a standby of beta (pg_rewind)" in rejoined.stdout, rejoined.stderr
    assert "base backup" not in rejoined.stdout + rejoined.stderr
    assert relation.stat().st_ino == inode, "pg_rewind keeps unchanged relation files; a copy would not"
    assert wait_for(lambda: _safe(lambda: _ids(pair, pair.alpha_port) == {1, 2}), timeout=15)
    assert _recovery(pair, pair.alpha_port) is True
    assert not list(Path(pair.primary.server.datadir).glob(".dbdeck-*")), "leftovers of the rewind"
    auto_conf = Path(pair.primary.server.datadir, "postgresql.auto.conf").read_text()
    assert "dbdeck-rewind" not in auto_conf and "restore_command" not in auto_conf


def test_a_clean_stop_outside_dbdeck_says_why_pg_rewind_cannot_work(local_pair):
    pair = local_pair
    _diverge_after_a_segment_switch(pair)
    pair.primary.server.stop(mode="fast")  # the operator's own clean stop: its checkpoint recycles WAL
    rejoined = pair.run("rebuild-replica", "--rejoin", "--node", "alpha")
    assert rejoined.returncode == 0, rejoined.stdout + rejoined.stderr
    assert "pg_rewind cannot rejoin alpha: pg_rewind failed: " in rejoined.stderr, rejoined.stderr
    assert "could not find previous WAL record" in rejoined.stderr, rejoined.stderr
    assert "falling back to a fresh base backup" in rejoined.stderr
    assert "alpha is streaming from beta" in rejoined.stdout
    assert _ids(pair, pair.alpha_port) == {1, 2}
    setup = pair.run("setup-master", "--dry-run", "--node", "beta")
    assert "warn wal_keep_size = 0MB" in setup.stdout and "clean stop by anyone else" in setup.stdout


def _synchronous(pair, port):
    return pair.sql(port, "SHOW synchronous_standby_names")[0][0]


def _sync_state(pair, port):
    rows = pair.sql(port, "SELECT sync_state FROM pg_stat_replication")
    return [row[0] for row in rows]


def test_synchronous_mode_survives_switchover_failover_and_rejoin_with_no_acknowledged_commit_lost(local_pair):
    pair = local_pair
    _with_config(pair, synchronous_standby_names="*")
    setup = pair.run("setup-master")
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert _synchronous(pair, pair.alpha_port) == "*"
    pair.sql(pair.alpha_port, "CREATE TABLE acks (id int PRIMARY KEY)")
    monitor = _start_monitor(pair)
    writer = Writer(pair, pause=0.003)
    writer.start()
    try:
        time.sleep(0.5)
        switched = pair.run("switchover")
        assert switched.returncode == 0, switched.stdout + switched.stderr
        assert "already running" not in switched.stderr
        assert _synchronous(pair, pair.beta_port) == "*"
        assert wait_for(lambda: _sync_state(pair, pair.beta_port) == ["sync"], timeout=20)

        # the switchover's new primary dies: failover back to alpha, beta rejoins
        os.kill(_postmaster_pid(pair, pair.standby_server.datadir), signal.SIGKILL)
        assert wait_for(lambda: _safe(lambda: _recovery(pair, pair.alpha_port) is False), timeout=30), \
            (pair.base / "monitor.log").read_text()
        assert wait_for(lambda: _safe(lambda: _sync_state(pair, pair.alpha_port) == ["sync"])
                        and pair.check()[0] == 0, timeout=90), \
            (pair.base / "monitor.log").read_text()
        assert _synchronous(pair, pair.alpha_port) == "*"

        # and once more: the rejoined node takes over again, synchronously
        time.sleep(0.5)
        os.kill(_postmaster_pid(pair, pair.primary.server.datadir), signal.SIGKILL)
        assert wait_for(lambda: _safe(lambda: _recovery(pair, pair.beta_port) is False), timeout=30)
        assert wait_for(lambda: _safe(lambda: _sync_state(pair, pair.beta_port) == ["sync"])
                        and pair.check()[0] == 0, timeout=90), \
            (pair.base / "monitor.log").read_text()
        assert _synchronous(pair, pair.beta_port) == "*"
        time.sleep(0.5)
    finally:
        writer.finish()
        _stop_monitor(monitor)
    acknowledged = set(writer.acknowledged)
    assert len(acknowledged) > 50
    assert acknowledged <= _ids(pair, pair.beta_port), "acknowledged commits lost"
    log = (pair.base / "monitor.log").read_text()
    assert log.count("rejoined as a standby of alpha (rewind)") == 1, log
    assert log.count("rejoined as a standby of beta (rewind)") == 1, log

    # synchronous replication silently lost is a warning
    pair.sql(pair.beta_port, "ALTER SYSTEM SET synchronous_standby_names = ''")
    pair.sql(pair.beta_port, "SELECT pg_reload_conf()")
    assert wait_for(lambda: pair.check()[0] == 1, timeout=10)
    code, report, _ = pair.check()
    assert any("commits do not wait for the standby" in p for p in report["problems"]), report
    assert {n["name"]: n["synchronous_standby_names"] for n in report["nodes"]}["beta"] == ""


def _start_as_a_user_would(server):
    """pg_ctl start on the data directory; returns whether the node then accepts writes."""
    try:
        server.start(timeout=20)
    except Exception:
        return False  # it cannot start at all: fine, it is not writable
    try:
        with psycopg.connect(host="127.0.0.1", port=server.port, user="postgres", dbname="postgres",
                             password=_start_as_a_user_would.password, connect_timeout=5) as conn:
            return not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]
    except psycopg.Error:
        return False


REJOIN_FAULTS = [
    "rewind.moved-aside", "rewind.wal-saved", "rewind.rewound", "rewind.configured", "rewind.moved-back",
    "rewind.wal-saved:error,basebackup.moved-aside", "rewind.wal-saved:error,basebackup.copied",
    "rewind.wal-saved:error,basebackup.moved-in",
    "rewind.wal-saved:error,basebackup.copied:error,restore.new-removed",
    "rewind.wal-saved:error,basebackup.copied:error,restore.fenced",
    "rewind.wal-saved:error,basebackup.copied:error,restore.moved-back",
]


# Every fault of REJOIN_FAULTS, in three runs of consecutive faults on one pair each (so that workers share
# the work). Each run starts at an even position: every fault still hits the node it hit in one long run.
REJOIN_FAULT_RUNS = {"rewind": REJOIN_FAULTS[0:4], "rewind-then-copy": REJOIN_FAULTS[4:8],
                     "copy-then-restore": REJOIN_FAULTS[8:]}
assert sum(REJOIN_FAULT_RUNS.values(), []) == REJOIN_FAULTS
assert all(REJOIN_FAULTS.index(faults[0]) % 2 == 0 for faults in REJOIN_FAULT_RUNS.values())


@pytest.mark.parametrize("faults", REJOIN_FAULT_RUNS.values(), ids=REJOIN_FAULT_RUNS.keys())
def test_killed_at_any_step_of_a_rejoin_the_old_primary_never_comes_back_writable(local_pair, faults):
    pair = local_pair
    _start_as_a_user_would.password = pair.primary.password
    servers = {"alpha": pair.primary.server, "beta": pair.standby_server}
    ports = {"alpha": pair.alpha_port, "beta": pair.beta_port}
    pair.sql(pair.alpha_port, "CREATE TABLE acks (id int PRIMARY KEY)")
    old, new = "alpha", "beta"
    for number, fault in enumerate(faults):
        # a split brain to resolve: the standby is promoted (--force) while the old primary keeps writing
        assert pair.wait_healthy(timeout=30), pair.check()[1]
        promoted = pair.run("promote-replica", "--force", "--node", new)
        assert promoted.returncode == 0, (fault, promoted.stdout + promoted.stderr)
        pair.sql(ports[old], f"INSERT INTO acks VALUES ({100000 + number})")  # divergent, thrown away
        pair.sql(ports[new], f"INSERT INTO acks VALUES ({number})")
        killed = pair.run("rebuild-replica", "--rejoin", "--node", old, env={"DBDECK_FAILPOINT": fault})
        assert killed.returncode == -signal.SIGKILL, (fault, killed.stdout + killed.stderr)
        assert not _start_as_a_user_would(servers[old]), f"{old} came back writable after a kill at {fault}"
        again = pair.run("rebuild-replica", "--rejoin", "--node", old)
        assert again.returncode == 0, (fault, again.stdout + again.stderr, servers[old].log_path.read_text()[-2500:])
        assert wait_for(lambda: _safe(lambda: _ids(pair, ports[old]) == set(range(number + 1))), timeout=20), fault
        assert _recovery(pair, ports[old]) is True
        assert not list(Path(servers[old].datadir).glob(".dbdeck-rewind-*")), fault
        old, new = new, old


@pytest.mark.parametrize("fault", ["fence.restart-policy", "fence.signal-written", "fence.stopped"])
def test_a_monitor_killed_while_fencing_leaves_no_writable_stale_primary(local_pair, fault):
    pair = local_pair
    _start_as_a_user_would.password = pair.primary.password
    log = open(pair.base / "monitor.log", "w")
    monitor = subprocess.Popen([str(Path(__file__).resolve().parents[2] / "bin" / "auto-failover"), "--config",
                                str(pair.config)], stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "DBDECK_FAILPOINT": fault})
    assert wait_for(lambda: "monitoring primary" in (pair.base / "monitor.log").read_text(), timeout=20)
    postmaster = _postmaster_pid(pair, pair.primary.server.datadir)
    os.kill(postmaster, signal.SIGKILL)
    assert monitor.wait(timeout=30) == -signal.SIGKILL, (pair.base / "monitor.log").read_text()
    assert wait_for(lambda: not Path(f"/proc/{postmaster}").exists(), timeout=15)  # reaped
    assert _recovery(pair, pair.beta_port) is True  # killed before promoting: no second primary
    assert wait_for(lambda: not files_in_use(pair.primary.server.datadir), timeout=15)  # the killed backends are gone
    if fault == "fence.restart-policy":
        # killed before anything was written: alpha is still the only primary, so taking writes is right
        assert _start_as_a_user_would(pair.primary.server), pair.primary.server.log_path.read_text()[-1500:]
        assert _recovery(pair, pair.beta_port) is True
        return
    assert not _start_as_a_user_would(pair.primary.server), f"alpha came back writable after a kill at {fault}"
    # nobody is primary now; the operator finishes what the monitor started
    promoted = pair.run("promote-replica", "--node", "beta")
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    assert "rebuild-replica --rejoin --node alpha" in promoted.stdout
    rejoined = pair.run("rebuild-replica", "--rejoin", "--node", "alpha")
    assert rejoined.returncode == 0, rejoined.stdout + rejoined.stderr
    code, report, _ = pair.check()
    assert code == 0 and report["primary"] == "beta", report


def test_operators_are_never_locked_out_by_the_monitor(local_pair):
    pair = local_pair
    monitor = _start_monitor(pair)
    pids = []
    try:
        pids = _freeze(pair)  # the primary hangs: the monitor's checks run back to back
        assert wait_for(lambda: "check failed" in (pair.base / "monitor.log").read_text(), timeout=10)
        for command in ("promote-replica", "rebuild-replica", "switchover"):
            result = pair.run(command, "--dry-run", timeout=60)
            assert result.returncode != 75 and "already running" not in result.stderr, (command, result.stderr)
    finally:
        for pid in pids:
            _safe(lambda: os.kill(pid, signal.SIGCONT))
    try:
        assert pair.wait_healthy(timeout=30)
        rebuilt = pair.run("rebuild-replica")  # a real one, while the monitor watches
        assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
        assert wait_for(lambda: (pair.base / "monitor.log").read_text().count("monitoring primary alpha") >= 2,
                        timeout=20), (pair.base / "monitor.log").read_text()
    finally:
        _stop_monitor(monitor)
    log = (pair.base / "monitor.log").read_text()
    assert "paused" in log and "FAILOVER" not in log, log


def test_a_second_daemon_says_it_is_already_running(local_pair):
    pair = local_pair
    _with_config(pair, auto_failover={"pid_file": str(pair.base / "af.pid"),
                                      "log_file": str(pair.base / "af.log")})
    first = pair.run("auto-failover", "--daemon", timeout=60)
    assert first.returncode == 0, first.stdout + first.stderr
    pid = int((pair.base / "af.pid").read_text())
    try:
        second = pair.run("auto-failover", "--daemon", timeout=60)
        assert second.returncode == 75, second.stdout + second.stderr
        assert "already running" in second.stderr and "running in the background" not in second.stdout
        up = {r["name"]: r for r in json.loads(pair.run("dbdeck", "status", "--format", "json").stdout)
              if r["kind"] == "service"}
        assert up["auto-failover"]["state"] == "up" and up["auto-failover"]["data"]["pid"] == pid
    finally:
        os.kill(pid, signal.SIGTERM)
        assert wait_for(lambda: not (pair.base / "af.pid").exists(), timeout=20)
    stopped = pair.run("dbdeck", "status", "--format", "prometheus")
    assert 'dbdeck_service_up{service="auto-failover"} 0.0' in stopped.stdout


_KILLING_MV = """#!/bin/sh
/bin/mv "$@"
count=$(($(cat "$MOVES") + 1)); echo "$count" > "$MOVES"
if [ "$count" -ge "$KILL_AFTER" ]; then kill -9 "$PPID"; fi
"""


def _move(script, data, name, kill_after=None):
    """Run one of the move scripts as rebuild and rejoin do (as the data directory's owner); with kill_after,
    kill -9 its shell right after that many renames (a kill in the middle of the move, which no failpoint
    between steps reaches)."""
    import pwd

    owner = pwd.getpwuid(data.stat().st_uid).pw_name
    env = dict(os.environ)
    if kill_after:
        fake = data.parent / "killing-mv"
        fake.mkdir(exist_ok=True)
        (fake / "mv").write_text(_KILLING_MV)
        (fake / "moves").write_text("0")
        subprocess.run(["chown", "-R", owner, str(fake)], check=True)
        (fake / "mv").chmod(0o755)
        env.update(PATH=f"{fake}:{env['PATH']}", MOVES=str(fake / "moves"), KILL_AFTER=str(kill_after))
    as_owner = ["runuser", "-u", owner, "--"] if os.geteuid() == 0 else []
    return subprocess.run([*as_owner, "sh", "-c", script, "sh", str(data), name], env=env,
                          capture_output=True).returncode


@pytest.mark.parametrize("direction", ["aside", "up"])
def test_files_split_by_a_move_killed_half_way_are_reunited_by_the_next_run(local_pair, direction):
    from dbdeck.plugins.replication.standby import MOVE_ASIDE, MOVE_UP

    pair = local_pair
    assert pair.wait_healthy(timeout=30), pair.check()[1]
    pair.sql(pair.alpha_port, "CREATE TABLE kept (id int); INSERT INTO kept VALUES (1)")
    assert wait_for(lambda: _safe(lambda: pair.sql(pair.beta_port, "SELECT id FROM kept") == [(1,)]), timeout=20)
    server = pair.standby_server
    data = Path(server.datadir)
    server.stop()
    if direction == "aside":  # rebuild or rejoin moving the node's files out of the way
        assert _move(MOVE_ASIDE, data, ".dbdeck-old-1", kill_after=5) == 128 + signal.SIGKILL
    else:  # rebuild moving its finished copy into place, the old files kept aside
        assert _move(MOVE_ASIDE, data, ".dbdeck-old-1") == 0
        subprocess.run(["cp", "-a", str(data / ".dbdeck-old-1"), str(data / ".dbdeck-new-1")], check=True)
        assert _move(MOVE_UP, data, ".dbdeck-new-1", kill_after=5) == 128 + signal.SIGKILL
    assert not (data / "PG_VERSION").exists() and any(p.name in ("base", "global", "pg_wal") for p in data.iterdir())

    rejoined = pair.run("rebuild-replica", "--rejoin", "--node", "beta")
    assert rejoined.returncode == 0, rejoined.stdout + rejoined.stderr
    said = rejoined.stdout + rejoined.stderr
    assert "left them split; moving them all into" in said, said
    assert "pg_basebackup" not in said, "the files were not reunited: the rejoin had to copy them all"
    assert not [p for p in data.glob("*/*") if p.name == p.parent.name], "a directory was moved into its namesake"
    assert wait_for(lambda: _safe(lambda: pair.sql(pair.beta_port, "SELECT id FROM kept") == [(1,)]), timeout=20)
    assert _recovery(pair, pair.beta_port) is True


def _base_backup_bytes(pair, port):
    """A base backup of the node at port, as one tar stream (what Barman and rebuild-replica copy)."""
    result = subprocess.run([str(pair.standby_server.bindir / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(port),
                             "-U", "postgres", "-D", "-", "-Ft", "-X", "fetch", "-c", "fast"],
                            capture_output=True, env={**os.environ, "PGPASSWORD": pair.primary.password}, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def test_the_replication_password_is_in_no_conninfo_server_log_or_base_backup(local_pair):
    pair = local_pair
    first = pair.password_file.read_text().strip()
    conninfo = pair.sql(pair.beta_port, "SHOW primary_conninfo")[0][0]
    assert "passfile='pg_replslot/dbdeck-replication-" in conninfo and first not in conninfo, conninfo
    assert first not in (pair.standby_server.datadir / "postgresql.auto.conf").read_text()
    assert pair.check()[0] == 0

    # a standby built by hand (pg_basebackup -R) has the password in its conninfo: check-replication says so,
    # without showing it
    pair.sql(pair.beta_port, f"ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port={pair.alpha_port} "
                             f"user=replicator password={first} application_name=beta'")
    pair.sql(pair.beta_port, "SELECT pg_reload_conf()")
    assert wait_for(pair.streams, timeout=30)
    code, report, result = pair.check()
    assert code == 1 and any("beta: the replication password is in its primary_conninfo" in problem
                             for problem in report["problems"]), report
    assert first not in result.stdout + result.stderr

    # the rotation moves it into a passfile: no secret in the conninfo, the logs or postgresql.auto.conf
    rotated = pair.run("rotate-replication-password")
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    second = pair.password_file.read_text().strip()
    assert second != first and pair.check()[0] == 0
    assert len(list((pair.standby_server.datadir / "pg_replslot").glob("dbdeck-replication-*.pgpass"))) == 1
    for text in (pair.sql(pair.beta_port, "SHOW primary_conninfo")[0][0],
                 (pair.standby_server.datadir / "postgresql.auto.conf").read_text(),
                 pair.standby_server.log_path.read_text(), pair.primary.server.log_path.read_text()):
        assert second not in text
    assert first not in (pair.standby_server.datadir / "postgresql.auto.conf").read_text()

    # promoted, the ex-standby's base backups (Barman's, a rebuild's) carry no secret; the demoted primary
    # follows it with a passfile too, and neither log shows the password
    switched = pair.run("switchover")
    assert switched.returncode == 0, switched.stdout + switched.stderr
    assert _recovery(pair, pair.beta_port) is False and pair.wait_healthy(timeout=30)
    backup = _base_backup_bytes(pair, pair.beta_port)
    assert b"PG_VERSION" in backup and second.encode() not in backup and first.encode() not in backup
    assert second not in pair.sql(pair.alpha_port, "SHOW primary_conninfo")[0][0]
    for log in (pair.standby_server.log_path, pair.primary.server.log_path):
        assert second not in log.read_text()
