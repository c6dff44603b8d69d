"""manager: patroni against Debian's patroni and etcd-server: three nodes on loopback, configured by
`dbdeck patroni render`, driven by the same dbdeck commands as a native pair, with a writer going
through HAProxy (the rendered haproxy.cfg, checking Patroni's REST API) the whole time."""

import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from ..conftest import new_password, wait_for
from .patroni_cluster import TUNED, PatroniCluster
from .test_failover import Writer

# one Patroni cluster at a time: three nodes and etcd on fixed loopback addresses, and most of a core
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("patroni")]


class _ProxyPair:
    """What test_failover's Writer needs: a password (it connects to 127.0.0.1:<port>)."""

    def __init__(self, password):
        self.primary = type("P", (), {"password": password})()


@pytest.fixture
def cluster(workdir):
    base = Path(tempfile.mkdtemp(prefix="patroni-", dir=workdir))
    os.chmod(base, 0o755)
    cluster = PatroniCluster(base, new_password(), patroni=TUNED)
    try:
        cluster.start_etcd()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def _ids(cluster, name):
    return {row[0] for row in cluster.sql(name, "SELECT id FROM acks")}


def _leader(cluster):
    return cluster.check()[1]["primary"]


def test_patroni_cluster_from_render_through_switchover_failover_node_loss_and_rebuild(cluster):
    dry = cluster.run("--dry-run", "patroni", "render", "--output", cluster.out)
    assert dry.returncode == 0 and "would write env.conf" in dry.stdout and not cluster.out.exists(), dry.stderr
    rendered = cluster.render()
    env = cluster.out / "env.conf"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert cluster.password not in (cluster.out / "n1.yml").read_text()
    assert cluster.password not in rendered.stdout + rendered.stderr
    node_config = (cluster.out / "n1.yml").read_text()
    assert "use_pg_rewind: true" in node_config and "etcd3:" in node_config and "synchronous_mode: true" in node_config
    assert "&id" not in node_config
    # rendering again (a config change) keeps the generated secrets
    before = env.read_text()
    cluster.render()
    assert env.read_text() == before

    cluster.start_all()
    cluster.start_haproxy()
    leader = _leader(cluster)

    code, report = cluster.check()
    assert code == 0 and report["manager"] == "patroni" and report["status"] == "OK"
    assert {m["name"] for m in report["patroni"]["members"]} == {"n1", "n2", "n3"}
    assert sorted(s["state"] for s in report["standbys"]) == ["streaming", "streaming"]
    text = cluster.run("check-replication")
    assert text.returncode == 0 and text.stdout.startswith(f"REPLICATION OK - primary {leader}, 2 standby streaming |")
    # after our own member table, Patroni's view of the same members
    assert re.search(r"^Patroni$", text.stdout, re.M) and re.search(rf"^{leader}\s+leader\s+running\s+1\b",
                                                                     text.stdout, re.M), text.stdout
    metrics = cluster.run("check-replication", "--format", "prometheus")
    assert metrics.returncode == 0 and "pg_replication_check_status 0.0" in metrics.stdout, metrics.stdout
    assert metrics.stdout.count("pg_up{") == 3 and "pg_replication_connected_standbys 2.0" in metrics.stdout
    status = cluster.run("--format", "json", "status")
    rows = {row["name"]: row for row in json.loads(status.stdout)}
    assert rows["pair"]["state"] == "ok" and rows["patroni"]["state"] == "ok" and "auto-failover" not in rows
    refused = cluster.run("auto-failover")
    assert refused.returncode == 2 and "Patroni fails over by itself" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

    cluster.sql(leader, "CREATE TABLE acks (id int PRIMARY KEY)")
    wait_for(lambda: _through_ok(cluster), timeout=15)
    writer = Writer(_ProxyPair(cluster.password), pause=0.002, ports=[cluster.proxy["write_port"]])
    writer.start()
    try:
        assert wait_for(lambda: len(writer.acknowledged) > 50, timeout=15)

        # planned switchover: Patroni's answer decides the exit code; back only once the new leader writes
        same = cluster.run("switchover", "--candidate", leader)
        assert same.returncode == 2 and "is the leader already" in same.stderr
        switched = cluster.run("switchover")
        assert switched.returncode == 0, switched.stdout + switched.stderr
        new_leader = _leader(cluster)
        assert new_leader != leader and "Successfully switched over" in switched.stdout
        _keeps_writing(writer)

        # promote-replica is for a lost primary; --force asks Patroni's /failover anyway
        cluster.wait_healthy()  # OK again once Patroni named the new synchronous standby
        held = cluster.run("promote-replica")
        assert held.returncode == 1 and "accepts writes" in held.stderr
        members = cluster.check()[1]["patroni"]["members"]
        synchronous = next(m["name"] for m in members if m["role"] == "sync_standby")
        asynchronous = next(m["name"] for m in members if m["role"] == "replica")
        wrong = cluster.run("promote-replica", "--force", "--node", asynchronous)
        assert wrong.returncode == 1 and "not the synchronous standby" in wrong.stderr, wrong.stderr
        forced = cluster.run("promote-replica", "--force")
        assert forced.returncode == 0, forced.stdout + forced.stderr
        assert _leader(cluster) == synchronous
        _keeps_writing(writer)
        cluster.wait_healthy()

        # the whole node is lost: Patroni and its postmaster killed; Patroni promotes the synchronous standby
        lost = _leader(cluster)
        cluster.kill_node(lost)
        assert wait_for(lambda: _writable_other_than(cluster, lost), timeout=60), \
            (cluster.base / f"patroni-{lost}.log").read_text()[-2000:]
        code, report = cluster.check()
        assert report["primary"] == _writable_other_than(cluster, lost), report
        assert code == 2 and any(lost in p for p in report["problems"]), report["problems"]
        _keeps_writing(writer)

        # the node comes back (systemctl start patroni@<node>): it rejoins by itself; then rebuild it anyway
        cluster.start(lost)
        cluster.wait_healthy()
        rebuilt = cluster.run("rebuild-replica", "--node", lost)
        assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
        assert "reinitialized" in rebuilt.stdout
        cluster.wait_healthy()
        _keeps_writing(writer)
    finally:
        writer.finish()
    final = _leader(cluster)
    acknowledged = set(writer.acknowledged)
    assert len(acknowledged) > 200
    assert acknowledged <= _ids(cluster, final), "acknowledged commits lost"
    for name in cluster.names:  # every node, the rebuilt one included, has them all
        wait_for(lambda name=name: acknowledged <= _ids(cluster, name), timeout=20)
        assert acknowledged <= _ids(cluster, name), name

    history = cluster.run("--format", "json", "history", "--kind", "patroni")
    timelines = [e for e in json.loads(history.stdout) if e["kind"] == "patroni.timeline"]
    assert len(timelines) >= 3, history.stdout
    assert cluster.password not in history.stdout


def _through_ok(cluster):
    try:
        return cluster.through("write_port", "SELECT NOT pg_is_in_recovery()") == [(True,)]
    except Exception:
        return False


def _writable_other_than(cluster, lost):
    """The node, other than lost, that accepts writes (plain SQL: cheap to poll)."""
    for name in cluster.names:
        try:
            if name != lost and cluster.sql(name, "SELECT NOT pg_is_in_recovery()") == [(True,)]:
                return name
        except Exception:
            continue
    return None


def _keeps_writing(writer):
    """Writes through the same HAProxy port resume (within a minute: Patroni's ttl 10 + HAProxy's checks)."""
    count = len(writer.acknowledged)
    assert wait_for(lambda: len(writer.acknowledged) > count + 50, timeout=60), "writes through HAProxy stopped"


def test_patroni_commands_refuse_clearly(cluster):
    cluster.render()
    # nothing runs yet: the REST API does not answer anywhere
    code, report = cluster.check()
    assert code == 2 and any("no Patroni REST API answers" in p for p in report["problems"]), report
    switched = cluster.run("switchover")
    assert switched.returncode == 1 and "does not answer" in switched.stderr
    assert len(switched.stderr.strip().splitlines()) == 1
    setup = cluster.run("setup-master")
    assert setup.returncode == 2 and "Patroni creates" in setup.stderr
    rejoin = cluster.run("rebuild-replica", "--rejoin", "--node", "n2")
    assert rejoin.returncode in (1, 2) and rejoin.stderr.strip()
    history = cluster.run("--format", "json", "history")
    assert history.returncode == 0
    assert [e["kind"] for e in json.loads(history.stdout)] == ["patroni.unreachable"], history.stdout


def test_native_pair_migrates_to_patroni_keeping_its_data(local_pair):
    """The README's migration: the same YAML with manager: patroni, `dbdeck patroni migrate`, then Patroni
    started on the primary's node first."""
    import yaml

    from dbdeck.plugins.sandbox.servers import free_port

    from .patroni_cluster import start_etcd, start_patroni

    pair = local_pair
    pair.sql(pair.alpha_port, "CREATE TABLE kept AS SELECT generate_series(1, 1000) AS id")
    # nodes on their own addresses, as on two hosts (Patroni refuses 127.0.0.1 as a connect address)
    for port, server in ((pair.alpha_port, pair.primary.server), (pair.beta_port, pair.standby_server)):
        pair.sql(port, "ALTER SYSTEM SET listen_addresses = '*'")
    pair.standby_server.stop()
    pair.primary.server.stop()
    pair.primary.server.start()
    pair.standby_server.start()
    assert wait_for(lambda: _streams_to(pair, "127.0.0.1", pair.alpha_port), timeout=60)
    assert wait_for(lambda: pair.check()[0] == 0, timeout=30), pair.check()[1]

    config = yaml.safe_load(pair.config.read_text())
    replication = config["replication"]
    hosts = {"alpha": "127.0.0.2", "beta": "127.0.0.3"}
    for name, node in replication["nodes"].items():
        node["endpoint"]["host"] = hosts[name]
        node["health_port"] = free_port()
    etcd_port, etcd_peer = free_port(), free_port()
    out = pair.base / "patroni"
    replication.update(manager="patroni", replication_networks=["127.0.0.0/8"],
                       patroni={"etcd_hosts": [f"127.0.0.1:{etcd_port}"], "config_dir": str(out), **TUNED})
    pair.config.write_text(yaml.safe_dump(config))

    no_etcd = pair.run("dbdeck", "patroni", "migrate")
    assert no_etcd.returncode == 1 and "etcd does not answer" in no_etcd.stderr, no_etcd.stderr
    assert pair.sql(pair.alpha_port, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'replica_slot'") \
        == [(1,)]
    etcd = start_etcd(pair.base, etcd_port, etcd_peer)
    processes = []
    try:
        dry = pair.run("dbdeck", "--dry-run", "patroni", "migrate")
        assert dry.returncode == 0 and "ALTER SYSTEM RESET" in dry.stdout, dry.stdout + dry.stderr
        assert not out.exists(), "a dry run wrote files"
        assert pair.sql(pair.alpha_port, "SELECT pg_is_in_recovery()") == [(False,)], "a dry run stopped alpha"
        assert pair.sql(pair.beta_port, "SELECT pg_is_in_recovery()") == [(True,)], "a dry run stopped beta"
        migrated = pair.run("dbdeck", "patroni", "migrate")
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr
        assert "start Patroni on alpha first" in migrated.stdout
        assert not pair.primary.server.is_running() and not pair.standby_server.is_running()
        # Patroni keeps its own pgpass: no copy of the replication password stays behind in beta's files
        assert not list((pair.standby_server.datadir / "pg_replslot").glob("*.pgpass"))
        processes.append(start_patroni(out, "alpha", pair.base / "patroni-alpha.log"))
        assert wait_for(lambda: _writable(pair, "127.0.0.2", pair.alpha_port), timeout=60), \
            (pair.base / "patroni-alpha.log").read_text()[-3000:]
        assert wait_for(lambda: _safe_check(pair) == "alpha", timeout=30), \
            (pair.base / "patroni-alpha.log").read_text()[-3000:]
        processes.append(start_patroni(out, "beta", pair.base / "patroni-beta.log"))
        assert wait_for(lambda: _streams_to(pair, "127.0.0.2", pair.alpha_port), timeout=90), \
            (pair.base / "patroni-beta.log").read_text()[-3000:]
        assert wait_for(lambda: pair.check()[0] == 0, timeout=30), \
            (pair.check()[1], (pair.base / "patroni-beta.log").read_text()[-3000:])
        code, report, _ = pair.check()
        assert report["manager"] == "patroni" and report["primary"] == "alpha"
        again = pair.run("dbdeck", "patroni", "migrate")
        assert again.returncode == 1 and "Patroni already manages these nodes" in again.stderr, again.stderr
        assert pair.check()[0] == 0
        assert [s["state"] for s in report["standbys"]] == ["streaming"]
        slots = {slot["slot_name"] for slot in report["nodes"][0]["slots"]}
        assert "replica_slot" not in slots and "beta" in slots
        assert _sql_at("127.0.0.3", pair, pair.beta_port, "SELECT count(*) FROM kept") == [(1000,)]
        # and it runs as a Patroni cluster: a switchover through Patroni, then pg_rewind's role is there
        switched = pair.run("dbdeck", "switchover", "--yes")
        assert switched.returncode == 0, switched.stdout + switched.stderr
        assert pair.check()[1]["primary"] == "beta"
        assert _sql_at("127.0.0.3", pair, pair.beta_port,
                       "SELECT count(*) FROM pg_roles WHERE rolname = 'rewind'") == [(1,)]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=60)
        etcd.terminate()
        etcd.wait(timeout=20)


def _sql_at(host, pair, port, statement):
    import psycopg

    with psycopg.connect(host=host, port=port, user="postgres", password=pair.primary.password, dbname="postgres",
                         connect_timeout=5, autocommit=True) as conn:
        return conn.execute(statement).fetchall()


def _writable(pair, host, port):
    try:
        return _sql_at(host, pair, port, "SELECT NOT pg_is_in_recovery()") == [(True,)]
    except Exception:
        return False


def _streams_to(pair, host, port):
    """A standby streams from the node at host:port (plain SQL: cheap to poll, unlike a dbdeck check)."""
    try:
        return _sql_at(host, pair, port, "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'") \
            == [(1,)]
    except Exception:
        return False


def _safe_check(pair):
    try:
        return pair.check()[1]["primary"]
    except Exception:
        return None
