"""Failover time: kill -9 of the primary -> the new primary accepts a write, auto-failover at its defaults.

The pair is built as the README says (PostgreSQL's defaults, setup-master --apply-settings, a restart,
rebuild-replica) with synchronous_standby_names '*', and a writer records every acknowledged commit
throughout: none may be lost. Baseline, measured in the same run on the same pair: the seed's approach,
a loop polling every 15 s (`pg_isready` then `pg_promote()`). Also one SIGSTOP of the primary for 4 s,
which must not cause a failover. Prints median and worst, and the ratio against the baseline.

    DBDECK_BENCH_CYCLES=10 (dbdeck cycles)   DBDECK_BENCH_BASELINE_CYCLES=3
"""

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dbdeck.plugins.sandbox.servers import PostgresServer, free_port, give_to, postgres_bindir  # noqa: E402
from dbdeck.run import Runner  # noqa: E402

CYCLES = int(os.environ.get("DBDECK_BENCH_CYCLES", "10"))
BASELINE_CYCLES = int(os.environ.get("DBDECK_BENCH_BASELINE_CYCLES", "3"))
BASELINE_INTERVAL = 15


class Bench:
    def __init__(self, base):
        self.base = base
        self.password = "bench-" + os.urandom(6).hex()
        self.ports = {"alpha": free_port(), "beta": free_port()}
        self.dirs = {name: base / name for name in self.ports}
        alpha = PostgresServer(self.dirs["alpha"], self.ports["alpha"], Runner(), socket_dir=base / "alpha.run")
        alpha.init(self.password, stock=True)
        alpha.start()
        self.servers = [alpha]
        give_to(self.dirs["beta"], alpha.os_user, 0o700)
        give_to(base / "beta.run", alpha.os_user, 0o700)
        self.config = base / "dbdeck.yaml"
        node = lambda name, settings: {  # noqa: E731
            "endpoint": {"host": "127.0.0.1", "port": self.ports[name], "user": "postgres",
                         "password": self.password, "database": "postgres", "connect_timeout": 3},
            "driver": "local", "data_dir": str(self.dirs[name]), "settings": settings}
        self.config.write_text(yaml.safe_dump({
            "dbdeck": {"run_dir": str(base / "run"), "state_dir": str(base / "state")},
            "replication": {"nodes": {"alpha": node("alpha", {}),
                                      "beta": node("beta", {"port": self.ports["beta"],
                                                            "unix_socket_directories": str(base / "beta.run")})},
                            "replication_password_file": str(base / "replicator.pw"), "log_dir": str(base / "logs"),
                            "synchronous_standby_names": "*"}}))
        subprocess.run([str(ROOT / "bin" / "setup-master"), "--config", str(self.config), "--apply-settings"],
                       capture_output=True)  # exits 1: wal_log_hints needs the restart that follows
        alpha.stop()
        alpha.start()
        for command in ("setup-master", "rebuild-replica"):
            self.run(command)

    def run(self, command, *args):
        result = subprocess.run([str(ROOT / "bin" / command), "--config", str(self.config), *args],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{command} failed:\n{result.stdout}{result.stderr}")
        return result

    def check(self):
        result = subprocess.run([str(ROOT / "bin" / "check-replication"), "--config", str(self.config),
                                 "--format", "json"], capture_output=True, text=True)
        return result.returncode, json.loads(result.stdout)

    def wait_healthy(self, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code, report = self.check()
            if code == 0:
                return report["primary"]
            time.sleep(0.3)
        raise SystemExit(f"pair not healthy after {timeout}s: {self.check()[1]['problems']}")

    def writable(self, name):
        try:
            with psycopg.connect(host="127.0.0.1", port=self.ports[name], user="postgres", password=self.password,
                                 dbname="postgres", connect_timeout=1, autocommit=True) as conn:
                conn.execute("SET statement_timeout = 1000")
                conn.execute("CREATE TABLE IF NOT EXISTS bench_writes (at timestamptz)")
                conn.execute("INSERT INTO bench_writes VALUES (now())")
            return True
        except psycopg.Error:
            return False

    def kill_primary(self, primary):
        pid = int((self.dirs[primary] / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        return time.monotonic()

    def until_writable(self, name, started, timeout=120):
        while time.monotonic() - started < timeout:
            if self.writable(name):
                return time.monotonic() - started
            time.sleep(0.05)
        raise SystemExit(f"{name} did not accept writes within {timeout}s")

    def other(self, name):
        return "beta" if name == "alpha" else "alpha"


class Writer(threading.Thread):
    """Commits one row at a time on whichever node takes writes; remembers every acknowledged id."""

    def __init__(self, bench):
        super().__init__(daemon=True)
        self.bench, self.stop, self.acknowledged, self.next_id = bench, threading.Event(), [], 1

    def run(self):
        while not self.stop.is_set():
            for name in self.bench.ports:
                try:
                    with psycopg.connect(host="127.0.0.1", port=self.bench.ports[name], user="postgres",
                                         password=self.bench.password, dbname="postgres", connect_timeout=1,
                                         autocommit=True) as conn:
                        conn.execute("SET statement_timeout = 5000")
                        while not self.stop.is_set():
                            conn.execute("INSERT INTO bench_acks VALUES (%s)", (self.next_id,))
                            self.acknowledged.append(self.next_id)
                            self.next_id += 1
                            time.sleep(0.005)
                except psycopg.Error:
                    self.next_id += 1
            time.sleep(0.02)


def dbdeck_cycles(bench):
    primary = bench.wait_healthy()
    with psycopg.connect(host="127.0.0.1", port=bench.ports[primary], user="postgres", password=bench.password,
                         dbname="postgres", autocommit=True) as conn:
        conn.execute("CREATE TABLE bench_acks (id int PRIMARY KEY)")
    writer = Writer(bench)
    writer.start()
    log = open(bench.base / "monitor.log", "w")
    monitor = subprocess.Popen([str(ROOT / "bin" / "auto-failover"), "--config", str(bench.config)], stdout=log,
                               stderr=subprocess.STDOUT)
    times = []
    try:
        for cycle in range(CYCLES):
            primary = bench.wait_healthy()
            time.sleep(1.5)  # a few healthy checks, as in steady state
            started = bench.kill_primary(primary)
            times.append(bench.until_writable(bench.other(primary), started))
            print(f"  dbdeck cycle {cycle + 1}: {primary} killed, {bench.other(primary)} writable after "
                  f"{times[-1]:.2f}s", flush=True)
        primary = bench.wait_healthy()
        false_failover = sigstop(bench, primary)
    finally:
        writer.stop.set()
        writer.join(timeout=20)
        monitor.send_signal(signal.SIGTERM)
        monitor.wait(timeout=60)
    primary = bench.wait_healthy()
    with psycopg.connect(host="127.0.0.1", port=bench.ports[primary], user="postgres", password=bench.password,
                         dbname="postgres") as conn:
        present = {row[0] for row in conn.execute("SELECT id FROM bench_acks")}
    lost = len(set(writer.acknowledged) - present)
    return times, false_failover, lost, len(writer.acknowledged)


def sigstop(bench, primary):
    """SIGSTOP the primary's processes for 4 s (< 3 failed checks); True when a failover happened anyway."""
    failovers_before = (bench.base / "monitor.log").read_text().count("FAILOVER:")
    pid = int((bench.dirs[primary] / "postmaster.pid").read_text().split()[0])
    pids = [pid] + [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                    text=True).stdout.split()]
    for p in pids:
        os.kill(p, signal.SIGSTOP)
    time.sleep(4)
    for p in pids:
        os.kill(p, signal.SIGCONT)
    time.sleep(4)
    return (bench.base / "monitor.log").read_text().count("FAILOVER:") > failovers_before


def baseline_cycles(bench):
    """The seed's way: poll every 15 s with pg_isready; when it fails, promote the standby. The seed knows
    nothing of synchronous replication (a promoted standby would wait for a standby forever): off here."""
    config = yaml.safe_load(bench.config.read_text())
    config["replication"]["synchronous_standby_names"] = ""
    bench.config.write_text(yaml.safe_dump(config))
    bench.run("setup-master", "--node", bench.wait_healthy())
    bindir = postgres_bindir()
    times = []
    for cycle in range(BASELINE_CYCLES):
        primary = bench.wait_healthy()
        standby = bench.other(primary)
        script = (f'while {bindir}/pg_isready -q -h 127.0.0.1 -p {bench.ports[primary]} -t 2; do sleep '
                  f'{BASELINE_INTERVAL}; done; PGPASSWORD="$BENCH_PW" {bindir}/psql -X -q -h 127.0.0.1 '
                  f'-p {bench.ports[standby]} -U postgres -d postgres -c "SELECT pg_promote()"')
        loop = subprocess.Popen(["bash", "-c", script], env={**os.environ, "BENCH_PW": bench.password},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # kill at a random point of the polling period, as a real failure would be
        time.sleep(1 + (cycle * 5.3) % BASELINE_INTERVAL)
        started = bench.kill_primary(primary)
        times.append(bench.until_writable(standby, started, timeout=60))
        loop.wait(timeout=60)
        print(f"  baseline cycle {cycle + 1}: {primary} killed, {standby} writable after {times[-1]:.2f}s",
              flush=True)
        bench.run("rebuild-replica", "--rejoin", "--node", primary)
    return times


def main():
    base = Path(tempfile.mkdtemp(prefix="dbdeck-bench-failover-"))
    os.chmod(base, 0o755)
    bench = None
    try:
        bench = Bench(base)
        print(f"failover bench: {CYCLES} kill -9 cycles with auto-failover defaults (interval 1 s, 3 failures or "
              f"1 refused connection, 2 s check timeout); baseline: {BASELINE_CYCLES} cycles of a {BASELINE_INTERVAL} s polling loop",
              flush=True)
        ours, false_failover, lost, acknowledged = dbdeck_cycles(bench)
        theirs = baseline_cycles(bench)
        median, worst = statistics.median(ours), max(ours)
        base_median, base_worst = statistics.median(theirs), max(theirs)
        print(f"dbdeck auto-failover: median {median:.2f}s, worst {worst:.2f}s (death -> new primary writable)")
        print(f"15 s polling loop (seed): median {base_median:.2f}s, worst {base_worst:.2f}s")
        print(f"ratio dbdeck/baseline: median {median / base_median:.2f}x, worst {worst / base_worst:.2f}x")
        print("anchors (their documented defaults, not measured here): Patroni ttl 30 s + loop_wait 10 s -> up to "
              "~40 s; repmgr 6 x 10 s -> ~60 s")
        print(f"SIGSTOP 4 s (< detection window): {'FALSE FAILOVER' if false_failover else 'no failover'}")
        print(f"synchronous replication: {acknowledged} acknowledged commits, {lost} lost")
        met = median <= 1.5 and not false_failover and lost == 0
        print(f"target median <= 1.5 s, no false failover, 0 lost: {'met' if met else 'MISSED'}")
    finally:
        for name, directory in (bench.dirs.items() if bench else []):
            server = PostgresServer(directory, bench.ports[name], Runner(),
                                    socket_dir=base / f"{name}.run")
            try:
                server.stop(mode="immediate")
            except Exception:
                pass
        subprocess.run(["rm", "-rf", str(base)])


if __name__ == "__main__":
    main()
