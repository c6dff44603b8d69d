"""Rules behind the replication safety fixes, without servers: the order files move in (a data directory
caught half-way never starts as a primary), failpoints, pg_rewind's reason, the synchronous verdict,
Nagios perfdata for what could not be measured, and the lock an operator waits on."""

import os
import subprocess
import sys
import threading
import time

import pytest

from dbdeck import faults
from dbdeck.errors import CommandFailed, DbdeckError, LockBusy
from dbdeck.lock import JobLock
from dbdeck.plugins.replication.cluster import OK, WARNING, NodeState, Snapshot, Standby, Thresholds, evaluate
from dbdeck.plugins.replication.standby import MOVE_ASIDE, MOVE_UP, rewind_reason


def _moves(tmp_path, script, *args):
    """Run a move script with a logging `mv` first on PATH; returns the basenames it moved, in order."""
    shim = tmp_path / "shim"
    shim.mkdir(exist_ok=True)
    log = tmp_path / "moves.log"
    (shim / "mv").write_text(f'#!/bin/sh\nprintf "%s\\n" "${{1##*/}}" >> {log}\nexec /bin/mv "$@"\n')
    (shim / "mv").chmod(0o755)
    subprocess.run(["sh", "-c", script, "sh", *map(str, args)], check=True,
                   env={**os.environ, "PATH": f"{shim}:{os.environ['PATH']}"})
    moved = log.read_text().split()
    log.unlink()
    # the marker naming the move while it runs (.dbdeck-moving) is renamed into place before the first file
    assert moved[0] == ".dbdeck-moving.new" and not (args[0] / ".dbdeck-moving").exists()
    return moved[1:]


def _data_dir(tmp_path):
    data = tmp_path / "data"
    (data / "base").mkdir(parents=True)
    (data / "global").mkdir()
    for name in ("PG_VERSION", "standby.signal", "postgresql.conf", "postgresql.auto.conf"):
        (data / name).write_text(name)
    (data / ".dbdeck-old-1").mkdir()  # a copy an earlier run kept: stays where it is
    return data


def test_files_move_aside_pg_version_first_standby_signal_last(tmp_path):
    data = _data_dir(tmp_path)
    moved = _moves(tmp_path, MOVE_ASIDE, data, ".dbdeck-rewind-2")
    assert moved[0] == "PG_VERSION" and moved[-1] == "standby.signal"
    assert sorted(os.listdir(data)) == [".dbdeck-old-1", ".dbdeck-rewind-2"]
    assert oct((data / ".dbdeck-rewind-2").stat().st_mode & 0o777) == "0o700"


def test_files_move_up_standby_signal_first_pg_version_last_dropping_copied_leftovers(tmp_path):
    data = _data_dir(tmp_path)
    _moves(tmp_path, MOVE_ASIDE, data, ".dbdeck-rewind-2")
    (data / ".dbdeck-rewind-2" / ".dbdeck-old-9").mkdir()  # came with a copy of the other node's files
    moved = _moves(tmp_path, MOVE_UP, data, ".dbdeck-rewind-2")
    assert moved[0] == "standby.signal" and moved[-1] == "PG_VERSION"
    assert ".dbdeck-old-9" not in moved and not (data / ".dbdeck-old-9").exists()
    assert sorted(os.listdir(data)) == sorted([".dbdeck-old-1", "PG_VERSION", "base", "global", "postgresql.conf",
                                               "postgresql.auto.conf", "standby.signal"])


def test_failpoints_fire_only_where_named(monkeypatch):
    monkeypatch.setenv(faults.VARIABLE, "a.b:error,c.d:error")
    faults.point("x.y")
    with pytest.raises(DbdeckError, match="injected failure at c.d"):
        faults.point("c.d")
    monkeypatch.delenv(faults.VARIABLE)
    faults.point("a.b")


def test_failpoint_kill_is_a_real_sigkill():
    code = "from dbdeck import faults; faults.point('x'); print('survived')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, faults.VARIABLE: "x"})
    assert result.returncode == -9 and "survived" not in result.stdout, result.stderr


def test_pg_rewind_reason_keeps_its_own_words():
    stderr = ("pg_rewind: servers diverged at WAL location 0/4260518 on timeline 1\n"
              "pg_rewind: error: could not find previous WAL record at 0/3000060\n")
    exc = CommandFailed("exit status 1: pg_rewind -D /x", stderr=stderr)
    assert rewind_reason(exc) == "error: could not find previous WAL record at 0/3000060"
    assert rewind_reason(CommandFailed("exit status 1: pg_rewind", stderr="")) == "exit status 1: pg_rewind"


def _pair(primary_names, sync_state):
    primary = NodeState("a", reachable=True, responded=True, in_recovery=False, timeline=2, system_identifier="7",
                        current_lsn="0/3000100", synchronous_standby_names=primary_names,
                        senders=[{"state": "streaming"}])
    standby = NodeState("b", reachable=True, responded=True, in_recovery=True, timeline=2, system_identifier="7")
    return Snapshot([primary, standby], [Standby("b", True, state="streaming", receiver_status="streaming",
                                                 lag_bytes=0, lag_seconds=0.0, sync_state=sync_state,
                                                 slot_name="replica_slot")])


def test_synchronous_replication_silently_lost_is_a_warning():
    wanted = Thresholds(synchronous_standby_names="*")
    assert evaluate(_pair("*", "sync"), wanted) == (OK, [])
    status, problems = evaluate(_pair("", "async"), wanted)
    assert status == WARNING and "commits do not wait for the standby" in problems[0]
    status, problems = evaluate(_pair("*", "async"), wanted)
    assert status == WARNING and "no standby is synchronous" in problems[0]
    assert evaluate(_pair("", "async"), Thresholds()) == (OK, [])  # asynchronous by choice


def test_perfdata_is_u_when_nothing_could_be_measured():
    from dbdeck.plugins.replication.commands import _text_report

    down = Snapshot([NodeState("a", error="refused"), NodeState("b", reachable=True, in_recovery=True)],
                    [Standby("b", True)])
    line = _text_report(down, 2, ["no primary"], Thresholds()).splitlines()[0]
    assert "lag_bytes=U;" in line and "lag_seconds=U;" in line
    assert "lag_bytes=0B" in _text_report(_pair("", "async"), 0, [], Thresholds()).splitlines()[0]


def test_an_operator_waits_for_the_lock_instead_of_failing(tmp_path):
    holder = JobLock("replication", tmp_path).acquire()
    threading.Timer(0.5, holder.release).start()
    said = []
    started = time.monotonic()
    waiter = JobLock("replication", tmp_path).acquire(wait=10, waiting=said.append)
    assert 0.4 < time.monotonic() - started < 5 and said and said[0]["pid"] == os.getpid()
    waiter.release()
    JobLock("replication", tmp_path).acquire()  # held again (not released): a zero wait fails at once
    with pytest.raises(LockBusy):
        JobLock("replication", tmp_path).acquire(wait=0)


def test_a_dead_postmaster_is_seen_dead_from_its_pid_file(tmp_path):
    from dbdeck.plugins.replication.nodes import files_in_use, postmaster_alive

    assert postmaster_alive(tmp_path) is False  # no postmaster.pid
    (tmp_path / "postmaster.pid").write_text(f"{os.getpid()}\n{tmp_path}\n")
    assert postmaster_alive(tmp_path) is True
    child = subprocess.Popen(["sleep", "30"])
    (tmp_path / "postmaster.pid").write_text(f"{child.pid}\n")
    child.kill()
    time.sleep(0.2)  # killed but not reaped yet: a zombie, which pg_ctl status still calls running
    assert postmaster_alive(tmp_path) is False
    child.wait()
    assert postmaster_alive(tmp_path) is False
    assert not files_in_use(tmp_path)
    worker = subprocess.Popen(["sleep", "30"], cwd=tmp_path)
    try:
        assert files_in_use(tmp_path)
    finally:
        worker.kill()
        worker.wait()


class _FakeSource:
    """A new primary whose oldest WAL segment is `oldest` (pg_ls_waldir), 16 MB segments."""

    name = "beta"

    def __init__(self, oldest):
        import contextlib

        self.oldest = oldest
        self.endpoint = type("E", (), {"driver_errors": lambda self, what: contextlib.nullcontext()})()

    def connect(self):
        import contextlib

        row = (self.oldest, 16 * 1024 * 1024)
        conn = type("C", (), {"execute": lambda self, sql: type("R", (), {"fetchone": lambda self: row})()})()
        return contextlib.nullcontext(conn)


def test_a_rewind_the_new_primary_cannot_feed_is_refused_with_the_reason():
    from dbdeck.plugins.replication.standby import RewindImpossible, _check_source_keeps_wal

    pair = type("P", (), {"runner": type("R", (), {"dry_run": False})()})()
    output = "pg_rewind: servers diverged at WAL location 0/F0000D8 on timeline 10\n"
    _check_source_keeps_wal(pair, _FakeSource("000000000000000F"), output)  # the fork's segment is there
    _check_source_keeps_wal(pair, _FakeSource("000000000000000E"), output)
    with pytest.raises(RewindImpossible, match="no longer has the WAL from the fork at 0/F0000D8"):
        _check_source_keeps_wal(pair, _FakeSource("0000000000000010"), output)
    _check_source_keeps_wal(pair, _FakeSource("0000000000000010"), "no rewind required\n")  # nothing to check
