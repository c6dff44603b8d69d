"""manager: patroni against Debian's patroni and etcd-server: three nodes on loopback, configured by
`dbdeck patroni render`, driven by the same dbdeck commands as a native pair, with a writer going
through HAProxy (the rendered haproxy.cfg, checking Patroni's REST API) the whole time."""

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from ..conftest import new_password, wait_for
from .patroni_cluster import TUNED, PatroniCluster
from .test_failover import Writer

pytestmark = pytest.mark.integration


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
    assert "patroni n1:" in text.stdout
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
        assert wait_for(lambda: _safe_leader(cluster) not in (None, lost), timeout=60), \
            (cluster.base / f"patroni-{lost}.log").read_text()[-2000:]
        code, report = cluster.check()
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


def _safe_leader(cluster):
    try:
        code, report = cluster.check()
        return report["primary"]
    except Exception:
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
