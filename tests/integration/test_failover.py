"""Fault injection on real local pairs: a writer records every acknowledged commit, a watcher checks
continuously that two writable primaries never exist, and each scenario checks both afterwards."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
import yaml

from ..conftest import BIN, first_json_document, wait_for

pytestmark = pytest.mark.integration


class Writer(threading.Thread):
    """Inserts ids one by one into whichever node accepts writes; remembers those acknowledged."""

    def __init__(self, pair, pause=0.01, ports=None):
        super().__init__(daemon=True)
        self.pair, self.pause, self.ports = pair, pause, ports
        self.acknowledged, self.stop = [], threading.Event()
        self.next_id = 1
        self.acknowledged_at = []

    def run(self):
        ports = self.ports or [self.pair.alpha_port, self.pair.beta_port]
        while not self.stop.is_set():
            for port in ports:
                try:
                    with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                                         password=self.pair.primary.password, connect_timeout=2,
                                         autocommit=True) as conn:
                        conn.execute("SET statement_timeout = 5000")
                        while not self.stop.is_set():
                            conn.execute("INSERT INTO acks VALUES (%s)", (self.next_id,))
                            self.acknowledged.append(self.next_id)
                            self.acknowledged_at.append(time.monotonic())
                            self.next_id += 1
                            time.sleep(self.pause)
                except psycopg.Error:
                    self.next_id += 1  # an unacknowledged attempt: its id may or may not exist
            time.sleep(0.05)

    def finish(self):
        self.stop.set()
        self.join(timeout=20)


class SplitBrainWatch(threading.Thread):
    """Samples both nodes every 50 ms; records any moment both accept writes."""

    def __init__(self, pair):
        super().__init__(daemon=True)
        self.pair, self.stop, self.both = pair, threading.Event(), []

    def writable(self, port):
        try:
            with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                                 password=self.pair.primary.password, connect_timeout=1, autocommit=True) as conn:
                return conn.execute("SELECT NOT pg_is_in_recovery()").fetchone()[0]
        except psycopg.Error:
            return False

    def run(self):
        while not self.stop.is_set():
            if self.writable(self.pair.alpha_port) and self.writable(self.pair.beta_port):
                self.both.append(time.time())
            time.sleep(0.05)

    def finish(self):
        self.stop.set()
        self.join(timeout=10)
        return self.both


def _ids(pair, port):
    return {row[0] for row in pair.sql(port, "SELECT id FROM acks")}


def _recovery(pair, port):
    return pair.sql(port, "SELECT pg_is_in_recovery()")[0][0]


def _with_config(pair, **replication):
    config = yaml.safe_load(pair.config.read_text())
    config["replication"].update(replication)
    pair.config.write_text(yaml.safe_dump(config))


def _postmaster_pid(pair, datadir):
    return int(Path(datadir, "postmaster.pid").read_text().split()[0])


def _freeze(pair):
    """SIGSTOP alpha's postmaster and all its children; returns their pids (to SIGCONT)."""
    pids = [_postmaster_pid(pair, pair.primary.server.datadir)]
    pids += [int(p) for p in subprocess.run(["pgrep", "-P", str(pids[0])], capture_output=True,
                                            text=True).stdout.split()]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


def _start_monitor(pair, *args, open_files=None):
    """auto-failover in the background; open_files: its descriptor limit (systemd's default for a unit
    without LimitNOFILE is 1024)."""
    import resource

    log = open(pair.base / "monitor.log", "w")
    limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))) if open_files else None
    process = subprocess.Popen([str(BIN / "auto-failover"), "--config", str(pair.config), *args],
                               stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit)
    assert wait_for(lambda: "monitoring primary" in (pair.base / "monitor.log").read_text(), timeout=20), \
        (pair.base / "monitor.log").read_text()
    return process


def _stop_monitor(process):
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0


def test_switchover_twice_under_write_load_loses_nothing(local_pair):
    pair = local_pair
    pair.sql(pair.alpha_port, "CREATE TABLE acks (id int PRIMARY KEY)")
    writer = Writer(pair)
    watch = SplitBrainWatch(pair)
    writer.start(), watch.start()
    time.sleep(0.5)
    dry = pair.run("switchover", "--dry-run")
    assert dry.returncode == 0 and "pre-checks passed" in dry.stdout and "plan:" in dry.stdout, dry.stderr
    first = pair.run("switchover")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "HAProxy" not in first.stdout + first.stderr, "no HAProxy is set up: nothing to hand over, no wait"
    assert _recovery(pair, pair.alpha_port) is True and _recovery(pair, pair.beta_port) is False
    # the new standby's timeline is the one it receives (its last restartpoint's would still be the old one)
    assert pair.wait_healthy(timeout=20), pair.check()[1]
    code, report, _ = pair.check()
    assert len({node["timeline"] for node in report["nodes"]}) == 1, report["nodes"]
    time.sleep(0.5)
    second = pair.run("switchover")
    assert second.returncode == 0, second.stdout + second.stderr
    time.sleep(0.5)
    writer.finish()
    assert not watch.finish(), "two writable primaries observed"
    assert _recovery(pair, pair.alpha_port) is False
    code, report, _ = pair.check()
    assert code == 0 and report["primary"] == "alpha"
    acknowledged = set(writer.acknowledged)
    assert len(acknowledged) > 20
    assert acknowledged <= _ids(pair, pair.alpha_port)
    assert list(pair.log_dir.glob("switchover-*.log"))


def test_switchover_refused_when_the_standby_is_down(local_pair):
    pair = local_pair
    pair.standby_server.stop()
    refused = pair.run("switchover")
    assert refused.returncode == 1 and "no standby is streaming" in refused.stderr
    assert _recovery(pair, pair.alpha_port) is False
    pair.sql(pair.alpha_port, "CREATE TABLE still_writable (x int)")  # the primary kept running


def test_kill_9_with_synchronous_replication_fails_over_without_losing_a_commit(local_pair):
    pair = local_pair
    _with_config(pair, synchronous_standby_names="*")
    setup = pair.run("setup-master")
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert pair.sql(pair.alpha_port, "SHOW synchronous_standby_names") == [("*",)]
    # rebuilt now, the standby carries the setting too (postgresql.auto.conf is copied): once promoted and
    # alone it would block every commit unless auto-failover relaxes it
    rebuilt = pair.run("rebuild-replica")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert pair.sql(pair.beta_port, "SHOW synchronous_standby_names") == [("*",)]
    pair.sql(pair.alpha_port, "CREATE TABLE acks (id int PRIMARY KEY)")
    monitor = _start_monitor(pair)
    writer, watch = Writer(pair, pause=0.002), SplitBrainWatch(pair)
    writer.start(), watch.start()
    try:
        time.sleep(1.0)
        os.kill(_postmaster_pid(pair, pair.primary.server.datadir), signal.SIGKILL)
        assert wait_for(lambda: _safe(lambda: _recovery(pair, pair.beta_port) is False), timeout=30), \
            (pair.base / "monitor.log").read_text()
        # the old primary rejoins as a standby on its own (pg_rewind after crash recovery)
        assert pair.wait_healthy(timeout=60), (
            (pair.base / "monitor.log").read_text() + pair.primary.server.log_path.read_text()[-3000:])
        time.sleep(0.5)
    finally:
        writer.finish()
        _stop_monitor(monitor)
    assert not watch.finish(), "two writable primaries observed"
    acknowledged = set(writer.acknowledged)
    assert len(acknowledged) > 20
    assert acknowledged <= _ids(pair, pair.beta_port), "acknowledged commits lost"
    log = (pair.base / "monitor.log").read_text()
    assert "FAILOVER: beta is the primary" in log and "rejoined" in log
    # alone, beta committed without waiting; once alpha rejoined, the configured synchronous setting applies
    assert "commits do not wait until one rejoins" in log
    assert pair.sql(pair.beta_port, "SHOW synchronous_standby_names") == [("*",)]


def _safe(check):
    try:
        return check()
    except Exception:
        return False


def test_sigstop_shorter_than_the_detection_window_causes_no_failover(local_pair):
    pair = local_pair
    monitor = _start_monitor(pair)
    pids = []
    try:
        pids = _freeze(pair)
        # 4 s: longer than one check's timeout (2 s), so a check must fail, shorter than 3 failed checks
        time.sleep(4)
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        time.sleep(3)
    finally:
        for pid in pids:
            _safe(lambda: os.kill(pid, signal.SIGCONT))
        _stop_monitor(monitor)
    log = (pair.base / "monitor.log").read_text()
    assert "check failed" in log, log  # the monitor did notice
    assert "FAILOVER" not in log
    assert _recovery(pair, pair.beta_port) is True and pair.check()[0] == 0


def test_monitor_that_cannot_reach_a_live_primary_does_not_fail_over(local_pair):
    pair = local_pair
    # the monitor's view of alpha is broken (a wrong port, like a lost route); beta still streams from it
    config = yaml.safe_load(pair.config.read_text())
    config["replication"]["nodes"]["alpha"]["endpoint"]["port"] = 1
    config["replication"]["primary"] = "alpha"
    broken = pair.base / "broken.yaml"
    broken.write_text(yaml.safe_dump(config))
    from dbdeck.cli import App
    from dbdeck.plugins.replication.failover import Monitor
    from dbdeck.plugins.replication.pair import Pair

    app = App()
    app.config_path = str(pair.config)
    monitor = Monitor(Pair(app), interval=0.1, failures=2, timeout=1)
    assert monitor.find_primary() and monitor.primary.name == "alpha"
    app_broken = App()
    app_broken.config_path = str(broken)
    monitor.pair = Pair(app_broken)
    monitor.primary = monitor.pair.node("alpha")
    assert monitor.tick() is None and monitor.tick() is None
    assert monitor.state == "held"
    assert _recovery(pair, pair.beta_port) is True and _recovery(pair, pair.alpha_port) is False


def test_fenced_old_primary_restarts_read_only(local_pair):
    pair = local_pair
    monitor = _start_monitor(pair, "--no-rejoin")
    watch = SplitBrainWatch(pair)
    watch.start()
    try:
        postmaster = _postmaster_pid(pair, pair.primary.server.datadir)
        os.kill(postmaster, signal.SIGKILL)
        assert wait_for(lambda: _safe(lambda: _recovery(pair, pair.beta_port) is False), timeout=30)
        assert wait_for(lambda: "FAILOVER" in (pair.base / "monitor.log").read_text(), timeout=10)
        # "restarts by itself a minute later": it comes back as a standby, never writable. (Once the killed
        # postmaster is reaped: this sandbox's init reaps orphans a second or two late, and pg_ctl refuses
        # to start while the old pid is still there.)
        from dbdeck.plugins.replication.nodes import files_in_use

        assert wait_for(lambda: not Path(f"/proc/{postmaster}").exists()
                        and not files_in_use(pair.primary.server.datadir), timeout=15)
        pair.primary.server.start()
        assert wait_for(lambda: _safe(lambda: _recovery(pair, pair.alpha_port) is True), timeout=30)
        time.sleep(1)
    finally:
        _stop_monitor(monitor)
    assert not watch.finish(), "two writable primaries observed"
    assert (Path(pair.primary.server.datadir) / "standby.signal").exists()


def test_divergent_old_primary_rejoins_through_pg_rewind(local_pair):
    pair = local_pair
    pair.sql(pair.alpha_port, "CREATE TABLE acks (id int PRIMARY KEY)")
    pair.sql(pair.alpha_port, "INSERT INTO acks VALUES (1)")
    assert wait_for(lambda: _safe(lambda: _ids(pair, pair.beta_port) == {1}), timeout=15)
    pair.sql(pair.beta_port, "SELECT pg_promote()")
    assert wait_for(lambda: _recovery(pair, pair.beta_port) is False, timeout=20)
    pair.sql(pair.alpha_port, "INSERT INTO acks SELECT generate_series(1000, 1100)")  # divergent: only on alpha
    pair.sql(pair.beta_port, "INSERT INTO acks VALUES (2)")
    rejoined = pair.run("rebuild-replica", "--rejoin", "--node", "alpha")
    assert rejoined.returncode == 0, rejoined.stdout + rejoined.stderr
    assert "rejoined as a standby of beta (pg_rewind)" in rejoined.stdout, rejoined.stderr
    assert "base backup" not in rejoined.stdout
    assert wait_for(lambda: _safe(lambda: _ids(pair, pair.alpha_port) == {1, 2}), timeout=15)
    assert _recovery(pair, pair.alpha_port) is True
    code, report, _ = pair.check()
    assert code == 0 and report["primary"] == "beta"


# Starts a server with this process as the subreaper of its orphans, and reaps them only when told to: the
# init of a container (or of this sandbox) that reaps late, which leaves a killed postmaster a zombie.
_SLOW_REAPER = r"""
import ctypes, os, subprocess, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
print("started", flush=True)
sys.stdin.readline()
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""


def test_a_killed_standby_whose_postmaster_is_not_reaped_yet_still_rejoins_through_pg_rewind(local_pair):
    from dbdeck.plugins.replication.nodes import files_in_use

    pair = local_pair
    beta = pair.standby_server
    beta.stop()
    argv = [str(beta.bindir / "pg_ctl"), "-D", str(beta.datadir), "-l", str(beta.log_path), "-w", "start"]
    if beta.os_user and os.geteuid() == 0:
        argv = ["runuser", "-u", beta.os_user, "--", *argv]
    reaper = subprocess.Popen([sys.executable, "-c", _SLOW_REAPER, *argv], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert reaper.stdout.readline().strip() == "started"
        assert wait_for(pair.streams, timeout=30)
        postmaster = _postmaster_pid(pair, beta.datadir)
        os.kill(postmaster, signal.SIGKILL)
        assert wait_for(lambda: "Z" in Path(f"/proc/{postmaster}/stat").read_text().split()[2], timeout=10)
        assert wait_for(lambda: not files_in_use(beta.datadir), timeout=15)
        rejoin = subprocess.Popen([str(BIN / "rebuild-replica"), "--config", str(pair.config), "--rejoin", "--node",
                                   "beta"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3)
        assert Path(f"/proc/{postmaster}").exists(), "the zombie was reaped early: nothing was tested"
        reaper.stdin.write("reap\n")
        reaper.stdin.flush()
        out, err = rejoin.communicate(timeout=120)
    finally:
        if reaper.poll() is None:
            reaper.stdin.write("reap\n")
            reaper.stdin.close()
            reaper.wait(timeout=30)
    assert rejoin.returncode == 0, out + err
    assert "rejoined as a standby of alpha (pg_rewind)" in out and "base backup" not in out + err, out + err
    assert pair.wait_healthy(timeout=30)


def test_daemon_mode_detaches_with_a_pid_file_and_stops_on_sigterm(local_pair):
    pair = local_pair
    _with_config(pair, auto_failover={"pid_file": str(pair.base / "af.pid"),
                                      "log_file": str(pair.base / "af.log")})
    started = pair.run("auto-failover", "--daemon", timeout=30)
    assert started.returncode == 0 and "pid" in started.stdout, started.stderr
    pid_file = pair.base / "af.pid"
    assert wait_for(pid_file.exists, timeout=20)
    pid = int(pid_file.read_text())
    assert wait_for(lambda: "monitoring primary alpha" in (pair.base / "af.log").read_text(), timeout=20)
    second = pair.run("auto-failover", timeout=30)  # the lock: one monitor at a time
    assert second.returncode == 75
    os.kill(pid, signal.SIGTERM)
    assert wait_for(lambda: not pid_file.exists(), timeout=20)
    assert "auto-failover stopped" in (pair.base / "af.log").read_text()
    # the daemon's file has no other clock: every line starts with the one time format
    from datetime import datetime

    lines = [line for line in (pair.base / "af.log").read_text().splitlines() if line.strip()]
    for line in lines:
        stamp = datetime.fromisoformat(line.split(" ", 1)[0])
        assert stamp.tzinfo is not None, line


def test_switchover_aborts_and_restarts_the_primary_when_the_standby_cannot_catch_up(local_pair):
    pair = local_pair
    pair.sql(pair.beta_port, "SELECT pg_wal_replay_pause()")  # the standby will not replay the checkpoint
    aborted = pair.run("switchover", "--timeout", "3")
    assert aborted.returncode == 1 and "switchover aborted" in aborted.stderr, aborted.stdout + aborted.stderr
    assert _recovery(pair, pair.alpha_port) is False and _recovery(pair, pair.beta_port) is True
    pair.sql(pair.alpha_port, "CREATE TABLE writable_again (x int)")  # read-only block lifted
    assert pair.sql(pair.alpha_port, "SHOW default_transaction_read_only") == [("off",)]
    pair.sql(pair.beta_port, "SELECT pg_wal_replay_resume()")
    assert pair.wait_healthy(timeout=30)


def test_dry_run_monitor_says_what_it_would_do_and_changes_nothing(local_pair):
    pair = local_pair
    monitor = _start_monitor(pair, "--dry-run")
    try:
        pair.primary.server.stop(mode="immediate")
        assert wait_for(lambda: "would fence alpha and promote beta" in (pair.base / "monitor.log").read_text(),
                        timeout=30), (pair.base / "monitor.log").read_text()
    finally:
        _stop_monitor(monitor)
    assert _recovery(pair, pair.beta_port) is True
    assert not (Path(pair.primary.server.datadir) / "standby.signal").exists()


def test_the_monitor_with_format_json_writes_one_document_saying_what_it_watches(local_pair):
    pair = local_pair
    process = subprocess.Popen([str(BIN / "auto-failover"), "--config", str(pair.config), "--format", "json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        document = first_json_document(process)
        assert document is not None, process.stderr.read() if process.poll() is not None else "no document"
        assert document["service"] == "auto-failover" and document["pid"] == process.pid, document
        assert document["nodes"] == ["alpha", "beta"], document
    finally:
        process.send_signal(signal.SIGTERM)
        rest, errors = process.communicate(timeout=60)
    assert process.returncode == 0, errors
    assert rest == "" and "auto-failover stopped" in errors, (rest, errors)
