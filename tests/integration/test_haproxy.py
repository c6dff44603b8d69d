"""One write endpoint through a real HAProxy (Debian's package), configured by `dbdeck haproxy render` and
routed by auto-failover's health checks: clients keep the same address across a kill -9 and a switchover."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import yaml

from dbdeck.plugins.sandbox.servers import free_port

from ..conftest import BIN, wait_for
from .test_failover import SplitBrainWatch, Writer, _ids, _postmaster_pid, _safe, _start_monitor, _stop_monitor

pytestmark = pytest.mark.integration


def health(port, path):
    """(status, body) of one health check, as HAProxy sees it."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _configure(pair, **haproxy):
    config = yaml.safe_load(pair.config.read_text())
    replication = config["replication"]
    ports = {"alpha": free_port(), "beta": free_port()}
    for name, port in ports.items():
        replication["nodes"][name]["health_port"] = port
    replication["synchronous_standby_names"] = "*"
    replication["haproxy"] = {"write_port": free_port(), "read_port": free_port(), "stats_port": free_port(),
                              **haproxy}
    pair.config.write_text(yaml.safe_dump(config))
    return ports, replication["haproxy"]


def _start_haproxy(pair, path):
    log = open(pair.base / "haproxy.log", "w")
    process = subprocess.Popen(["/usr/sbin/haproxy", "-db", "-f", str(path)], stdout=log, stderr=subprocess.STDOUT)
    return process


def _through(port, pair, statement):
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=port, user="postgres", password=pair.primary.password,
                         dbname="postgres", connect_timeout=3, autocommit=True) as conn:
        return conn.execute(statement).fetchall()


def test_writes_follow_the_primary_through_haproxy_across_kill_9_and_switchover(local_pair):
    pair = local_pair
    health_ports, proxy = _configure(pair)
    setup = pair.run("setup-master")
    assert setup.returncode == 0, setup.stdout + setup.stderr
    rebuilt = pair.run("rebuild-replica")  # the standby now connects with the synchronous setting in place
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr

    missing = pair.run("dbdeck", "haproxy", "render", "--output", pair.base / "nowhere" / "x.cfg", "--dry-run")
    assert missing.returncode == 0 and "would write" in missing.stdout and not (pair.base / "nowhere").exists()
    cfg = pair.base / "haproxy.cfg"
    rendered = pair.run("dbdeck", "haproxy", "render", "--output", cfg)
    assert rendered.returncode == 0, rendered.stdout + rendered.stderr
    text = cfg.read_text()
    assert "on-marked-down shutdown-sessions" in text and "uri /primary" in text
    assert f"server alpha 127.0.0.1:{pair.alpha_port} check addr 127.0.0.1 port {health_ports['alpha']}" in text
    assert subprocess.run(["/usr/sbin/haproxy", "-c", "-f", str(cfg)], capture_output=True).returncode == 0

    pair.sql(pair.alpha_port, "CREATE TABLE acks (id int PRIMARY KEY)")
    # check-replication --serve answers the same checks (for a host without auto-failover)
    metrics_port = free_port()
    exporter = subprocess.Popen([str(BIN / "check-replication"), "--config", str(pair.config), "--serve",
                                 f"127.0.0.1:{metrics_port}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    try:
        assert wait_for(lambda: _safe(lambda: health(health_ports["alpha"], "/primary")[0] == 200), timeout=20)
        assert health(health_ports["beta"], "/replica")[0] == 200
    finally:
        exporter.send_signal(signal.SIGTERM)
        assert exporter.wait(timeout=30) == 0, exporter.stderr.read()
    # with the descriptors a unit without LimitNOFILE gets: 1,200 idle clients below must not starve it
    monitor = _start_monitor(pair, open_files=1024)
    haproxy = _start_haproxy(pair, cfg)
    writer = watch = None
    # beside auto-failover, the exporter serves its metrics and leaves the health ports to the monitor
    exporter = subprocess.Popen([str(BIN / "check-replication"), "--config", str(pair.config), "--serve",
                                 f"127.0.0.1:{metrics_port}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    try:
        assert wait_for(lambda: _safe(lambda: b"pg_up" in urllib.request.urlopen(
            f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()), timeout=20)
    finally:
        exporter.send_signal(signal.SIGTERM)
        exporter.wait(timeout=30)
    assert "not answering health checks" in exporter.stderr.read()
    try:
        assert health(health_ports["alpha"], "/primary")[0] == 200
        code, body = health(health_ports["beta"], "/primary")
        assert code == 503 and body["role"] == "replica", body
        assert health(health_ports["beta"], "/replica?lag=16MB")[0] == 200
        assert health(health_ports["beta"], "/sync")[0] == 200
        assert health(health_ports["alpha"], "/replica")[0] == 503
        assert health(health_ports["alpha"], "/read-only")[0] == 200
        assert health(health_ports["alpha"], "/nonsense")[0] == 404
        assert wait_for(lambda: _safe(lambda: _through(proxy["write_port"], pair, "SELECT pg_is_in_recovery()")
                                      == [(False,)]), timeout=10), (pair.base / "haproxy.log").read_text()
        assert wait_for(lambda: _safe(lambda: _through(proxy["read_port"], pair, "SELECT pg_is_in_recovery()")
                                      == [(True,)]), timeout=10)

        # a client that only knows HAProxy's write port
        writer, watch = Writer(pair, pause=0.002, ports=[proxy["write_port"]]), SplitBrainWatch(pair)
        writer.start(), watch.start()
        assert wait_for(lambda: len(writer.acknowledged) > 50, timeout=10)
        # idle clients on both health ports, held through the failover: the monitor keeps its descriptors
        # and HAProxy's checks keep their answers
        idle = [socket.create_connection(("127.0.0.1", health_ports[name])) for name in ("alpha", "beta")
                for _ in range(600)]
        killed_at = time.monotonic()
        os.kill(_postmaster_pid(pair, pair.primary.server.datadir), signal.SIGKILL)
        assert wait_for(lambda: any(t > killed_at + 0.2 for t in writer.acknowledged_at), timeout=30), \
            (pair.base / "monitor.log").read_text()
        assert health(health_ports["beta"], "/primary")[0] == 200
        for client in idle:
            client.close()
        assert pair.sql(pair.beta_port, "SELECT pg_is_in_recovery()") == [(False,)]
        after_kill = [i for i, t in zip(writer.acknowledged, writer.acknowledged_at) if t > killed_at + 0.2]
        assert set(after_kill) <= _ids(pair, pair.beta_port), "writes through HAProxy went elsewhere than beta"
        assert health(health_ports["beta"], "/primary")[0] == 200
        # the old primary rejoins as a standby; the read port then finds it
        assert pair.wait_healthy(timeout=60), (pair.base / "monitor.log").read_text()
        assert health(health_ports["alpha"], "/primary")[0] == 503
        assert wait_for(lambda: _safe(lambda: _through(proxy["read_port"], pair, "SELECT pg_is_in_recovery()")
                                      == [(True,)]), timeout=10)

        # the second role change, planned: the same client, the same port; switchover returns once HAProxy
        # (its stats page) routes writes to the new primary, so a connection opened right then reaches it
        switched = pair.run("switchover")
        assert switched.returncode == 0, switched.stdout + switched.stderr
        assert "HAProxy marked beta down" in switched.stdout, switched.stdout
        assert "HAProxy routes writes to alpha" in switched.stdout, switched.stdout
        assert _through(proxy["write_port"], pair, "SELECT pg_is_in_recovery(), inet_server_port()") == \
            [(False, pair.alpha_port)]
        before = len(writer.acknowledged)
        assert wait_for(lambda: len(writer.acknowledged) > before + 50, timeout=30)
        assert pair.sql(pair.alpha_port, "SELECT pg_is_in_recovery()") == [(False,)]

        # and back, with dbdeck not told where HAProxy's stats are: it waits on the nodes' /primary answers
        # and HAProxy's check interval instead
        config = yaml.safe_load(pair.config.read_text())
        del config["replication"]["haproxy"]["stats_port"]
        pair.config.write_text(yaml.safe_dump(config))
        assert pair.wait_healthy(timeout=60)
        switched = pair.run("switchover")
        assert switched.returncode == 0, switched.stdout + switched.stderr
        assert "waited for HAProxy's next check" in switched.stdout, switched.stdout
        assert _through(proxy["write_port"], pair, "SELECT pg_is_in_recovery(), inet_server_port()") == \
            [(False, pair.beta_port)]
        before = len(writer.acknowledged)
        assert wait_for(lambda: len(writer.acknowledged) > before + 50, timeout=30)
    finally:
        if writer:
            writer.finish()
        haproxy.send_signal(signal.SIGTERM)
        haproxy.wait(timeout=10)
        _stop_monitor(monitor)
    assert not watch.finish(), "two writable primaries observed"
    acknowledged = set(writer.acknowledged)
    assert len(acknowledged) > 200
    assert acknowledged <= _ids(pair, pair.beta_port), "acknowledged commits lost"
    log = (pair.base / "monitor.log").read_text()
    assert "Traceback" not in log and "Too many open files" not in log, log[-3000:]
    # the health listeners closed with the monitor
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{health_ports['alpha']}/health", timeout=2)


def test_render_refuses_nodes_without_a_health_port_and_a_config_haproxy_rejects(workdir):
    import tempfile
    from pathlib import Path

    from ..conftest import BIN

    workdir = Path(tempfile.mkdtemp(prefix="haproxy-", dir=workdir))
    config = workdir / "dbdeck.yaml"
    node = lambda port, **extra: {"endpoint": {"host": "127.0.0.1", "port": port, "user": "postgres"},  # noqa: E731
                                  "data_dir": str(workdir / str(port)), **extra}
    config.write_text(yaml.safe_dump({"replication": {"nodes": {"alpha": node(5432), "beta": node(5433)}}}))
    target = workdir / "haproxy.cfg"

    def render(*args):
        return subprocess.run([str(BIN / "dbdeck"), "--config", str(config), "haproxy", "render", *args],
                              capture_output=True, text=True, timeout=60)

    refused = render("-o", str(target))
    assert refused.returncode == 2 and "beta have no health_port" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not target.exists()
    config.write_text(yaml.safe_dump({"replication": {
        "nodes": {"alpha": node(5432, health_port=8008), "beta": node(5433, health_port=8009)},
        "haproxy": {"bind": "not-an-address"}}}))
    rejected = render("-o", str(target))
    assert rejected.returncode == 1 and "haproxy -c rejects" in rejected.stderr, rejected.stderr
    assert not target.exists()
    printed = render("--snippet")
    assert printed.returncode == 0 and printed.stdout.count("listen dbdeck_") == 2 and "global" not in printed.stdout
    as_json = subprocess.run([str(BIN / "dbdeck"), "--config", str(config), "--format", "json", "haproxy", "render",
                              "--no-check"], capture_output=True, text=True, timeout=60)
    assert "listen dbdeck_write" in json.loads(as_json.stdout)["files"]["haproxy.cfg"]
