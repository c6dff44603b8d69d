"""Client-visible outage through HAProxy: kill -9 of the primary -> the next write through HAProxy's write
port succeeds. The client never changes its address; HAProxy's configuration is `dbdeck haproxy render`'s
(native pair) or `dbdeck patroni render`'s (Patroni).

  * native pair (README-built, synchronous_standby_names '*') with auto-failover at its defaults;
  * Patroni + etcd (three nodes) at Patroni's defaults (ttl 30, loop_wait 10, retry_timeout 10) and tuned
    (ttl 10, loop_wait 2, retry_timeout 3): the postmaster killed (Patroni restarts it in place) and the
    whole node killed (Patroni and its postmaster: a failover).

Median and worst per case; the ratios compare each Patroni case with the native pair, measured in the same
run. Target: native pair median <= 2 s.
    DBDECK_BENCH_HA_CYCLES=5   DBDECK_BENCH_HA_CASES=native,defaults,tuned
"""

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from failover import Bench  # noqa: E402
from tests.integration.patroni_cluster import TUNED, PatroniCluster  # noqa: E402

from dbdeck.plugins.sandbox.servers import PostgresServer, free_port  # noqa: E402
from dbdeck.run import Runner  # noqa: E402

CYCLES = int(os.environ.get("DBDECK_BENCH_HA_CYCLES", "5"))
CASES = os.environ.get("DBDECK_BENCH_HA_CASES", "native,defaults,tuned").split(",")


def write_through(port, password, started, timeout=180):
    """Seconds from `started` until a write through HAProxy commits (a new connection per attempt, as an
    application's pool reconnects)."""
    while time.monotonic() - started < timeout:
        try:
            with psycopg.connect(host="127.0.0.1", port=port, user="postgres", password=password,
                                 dbname="postgres", connect_timeout=1, autocommit=True) as conn:
                conn.execute("SET statement_timeout = 2000")
                conn.execute("INSERT INTO bench_ha VALUES (now())")
            return time.monotonic() - started
        except psycopg.Error:
            time.sleep(0.02)
    raise SystemExit(f"no write through HAProxy within {timeout}s")


def native(base):
    bench = Bench(base)
    config = yaml.safe_load(bench.config.read_text())
    for name in bench.ports:
        config["replication"]["nodes"][name]["health_port"] = free_port()
    proxy = free_port()
    config["replication"]["haproxy"] = {"write_port": proxy, "read_port": None}
    bench.config.write_text(yaml.safe_dump(config))
    bench.run("dbdeck", "haproxy", "render", "--output", base / "haproxy.cfg")
    primary = bench.wait_healthy()
    with psycopg.connect(host="127.0.0.1", port=bench.ports[primary], user="postgres", password=bench.password,
                         dbname="postgres", autocommit=True) as conn:
        conn.execute("CREATE TABLE bench_ha (at timestamptz)")
    monitor = subprocess.Popen([str(ROOT / "bin" / "auto-failover"), "--config", str(bench.config)],
                               stdout=open(base / "monitor.log", "w"), stderr=subprocess.STDOUT)
    haproxy = subprocess.Popen(["/usr/sbin/haproxy", "-db", "-f", str(base / "haproxy.cfg")],
                               stdout=open(base / "haproxy.log", "w"), stderr=subprocess.STDOUT)
    times = []
    try:
        write_through(proxy, bench.password, time.monotonic(), 30)
        for cycle in range(CYCLES):
            primary = bench.wait_healthy()
            write_through(proxy, bench.password, time.monotonic(), 30)
            time.sleep(1.5)
            started = bench.kill_primary(primary)
            times.append(write_through(proxy, bench.password, started))
            print(f"  native cycle {cycle + 1}: {primary} killed, write through HAProxy after {times[-1]:.2f}s",
                  flush=True)
        bench.wait_healthy()
    finally:
        haproxy.terminate()
        monitor.send_signal(signal.SIGTERM)
        monitor.wait(timeout=60)
        haproxy.wait(timeout=10)
        for name, directory in bench.dirs.items():
            try:
                PostgresServer(directory, bench.ports[name], Runner(),
                               socket_dir=base / f"{name}.run").stop(mode="immediate")
            except Exception:
                pass
    return times


def patroni(base, label, settings):
    cluster = PatroniCluster(base, "bench-" + os.urandom(6).hex(), patroni=settings)
    results = {"postmaster": [], "node": []}
    try:
        cluster.start_etcd()
        cluster.render()
        cluster.start_all()
        cluster.start_haproxy()
        leader = cluster.wait_healthy()
        cluster.sql(leader, "CREATE TABLE bench_ha (at timestamptz)")
        port = cluster.proxy["write_port"]
        for kind in ("postmaster", "node"):
            for cycle in range(CYCLES):
                leader = cluster.wait_healthy(timeout=300)
                write_through(port, cluster.password, time.monotonic(), 60)
                time.sleep(1.5)
                started = time.monotonic()
                if kind == "postmaster":
                    os.kill(cluster.postmaster_pid(leader), signal.SIGKILL)
                else:
                    cluster.kill_node(leader)
                results[kind].append(write_through(port, cluster.password, started))
                print(f"  patroni {label} cycle {cycle + 1}: {kind} of {leader} killed, write through HAProxy "
                      f"after {results[kind][-1]:.2f}s", flush=True)
                if kind == "node":
                    cluster.start(leader)
    finally:
        cluster.stop()
    return results


def line(label, times, reference=None):
    median, worst = statistics.median(times), max(times)
    ratio = (f"  ({median / statistics.median(reference):.1f}x the native median, "
             f"{worst / max(reference):.1f}x its worst)" if reference else "")
    print(f"{label:<40} median {median:6.2f}s  worst {worst:6.2f}s{ratio}")


def main():
    top = Path(tempfile.mkdtemp(prefix="dbdeck-bench-ha-"))
    os.chmod(top, 0o755)
    try:
        print(f"ha_endpoint bench: {CYCLES} kill -9 cycles per case, a client writing through HAProxy's port",
              flush=True)
        cases = {}
        for name in ["native"] + [case for case in CASES if case != "native"]:
            base = top / name
            base.mkdir()
            os.chmod(base, 0o755)
            if name == "native":
                cases["native"] = native(base)
            else:
                found = patroni(base, name, {} if name == "defaults" else TUNED)
                cases[f"patroni {name}, postmaster killed"] = found["postmaster"]
                cases[f"patroni {name}, whole node killed"] = found["node"]
        reference = cases["native"]
        print()
        line("native pair + auto-failover", reference)
        for label, times in cases.items():
            if label != "native":
                line(label, times, reference)
        median = statistics.median(reference)
        print(f"target: native pair through HAProxy <= 2 s median: {'met' if median <= 2 else 'MISSED'} "
              f"({median:.2f}s)")
    finally:
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
