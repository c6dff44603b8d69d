"""manager: patroni without servers: the rendered files, the configuration's rules, and how dbdeck reads
Patroni's /cluster (which replica to choose, what is a problem)."""

import json
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from dotenv import dotenv_values

from dbdeck.plugins.replication.cluster import CRITICAL, WARNING
from dbdeck.plugins.replication.model import Replication
from dbdeck.plugins.replication.patroni import _running_replicas, leader_of, problems

BIN = Path(__file__).resolve().parents[2] / "bin"
PASSWORD = "s3cret 'with\" quotes\\ and $dollar"


def _config(tmp_path, **replication):
    node = lambda host: {"endpoint": {"host": host, "port": 5432, "user": "postgres",  # noqa: E731
                                      "password": PASSWORD}, "data_dir": f"/var/lib/pg/{host}", "health_port": 8008}
    config = {"dbdeck": {"state_dir": str(tmp_path / "state")},
              "replication": {"manager": "patroni", "nodes": {"pg1": node("10.0.0.1"), "pg2": node("10.0.0.2")},
                              "replication_networks": ["10.0.0.0/24"], "synchronous_standby_names": "*",
                              "patroni": {"scope": "conecta", "etcd_hosts": ["10.0.0.5:2379"],
                                          "client_networks": ["10.0.1.0/24"]},
                              "backup": {"home": str(tmp_path / "barman")}, **replication}}
    path = tmp_path / "dbdeck.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _dbdeck(config, *args):
    return subprocess.run([str(BIN / "dbdeck"), "--config", str(config), *args], capture_output=True, text=True,
                          timeout=60)


def test_render_writes_node_files_without_passwords_and_a_0600_env_file(tmp_path):
    out = tmp_path / "patroni"
    result = _dbdeck(_config(tmp_path), "patroni", "render", "--no-check", "-o", str(out))
    assert result.returncode == 0, result.stderr
    node = yaml.safe_load((out / "pg1.yml").read_text())
    assert node["scope"] == "conecta" and node["etcd3"] == {"hosts": ["10.0.0.5:2379"]}
    assert node["restapi"]["connect_address"] == "10.0.0.1:8008"
    assert node["postgresql"]["connect_address"] == "10.0.0.1:5432"
    dcs = node["bootstrap"]["dcs"]
    assert dcs["synchronous_mode"] is True and dcs["postgresql"]["use_pg_rewind"] is True
    assert dcs["slots"] == {"barman": {"type": "physical"}}
    assert "host replication replicator 10.0.0.0/24 scram-sha-256" in node["postgresql"]["pg_hba"]
    assert "host all all 10.0.1.0/24 scram-sha-256" in node["postgresql"]["pg_hba"]
    assert node["postgresql"]["authentication"]["rewind"] == {"username": "rewind"}
    for name in ("pg1.yml", "pg2.yml", "haproxy.cfg"):
        assert PASSWORD not in (out / name).read_text()
    env = out / "env.conf"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    values = dotenv_values(env)  # systemd's and dotenv's quoting agree on "..." with \" and \\
    assert values["PATRONI_SUPERUSER_PASSWORD"] == PASSWORD
    assert values["PATRONI_RESTAPI_USERNAME"] == "dbdeck" and len(values["PATRONI_REWIND_PASSWORD"]) >= 24
    assert PASSWORD not in result.stdout + result.stderr
    haproxy = (out / "haproxy.cfg").read_text()
    assert "server pg1 10.0.0.1:5432 check addr 10.0.0.1 port 8008" in haproxy


def test_render_dry_run_and_json(tmp_path):
    out = tmp_path / "patroni"
    dry = _dbdeck(_config(tmp_path), "--dry-run", "patroni", "render", "--no-check", "-o", str(out))
    assert dry.returncode == 0 and "would write env.conf" in dry.stdout and not out.exists()
    assert not (tmp_path / "state" / "replication" / "rewind.password").exists()
    as_json = _dbdeck(_config(tmp_path), "--format", "json", "patroni", "render", "--no-check", "-o", str(out))
    assert json.loads(as_json.stdout)["written"][-1].endswith("haproxy.cfg")


def test_native_commands_refuse_under_patroni_and_render_refuses_a_native_pair(tmp_path):
    refused = _dbdeck(_config(tmp_path), "auto-failover")
    assert refused.returncode == 2 and "Patroni fails over by itself" in refused.stderr
    rotation = _dbdeck(_config(tmp_path), "rotate-replication-password", "--yes")
    assert rotation.returncode == 2 and "Patroni owns the replication role" in rotation.stderr
    path = _config(tmp_path, manager="native")
    config = yaml.safe_load(path.read_text())
    config["replication"]["nodes"]["pg2"]["health_port"] = 8009  # one dbdeck answers both: two ports
    path.write_text(yaml.safe_dump(config))
    native = _dbdeck(path, "patroni", "render", "--no-check")
    assert native.returncode == 2 and "manager is native" in native.stderr


@pytest.mark.parametrize("change, message", [
    ({"patroni": None}, "needs patroni"),
    ({"patroni": {"etcd_hosts": ["not a host"]}}, "etcd client URL"),
    ({"patroni": {"etcd_hosts": ["e:2379"], "scope": "a b"}}, "letters"),
    ({"patroni": {"etcd_hosts": ["e:2379"], "rewind_user": "re'wind"}}, "letters"),
])
def test_patroni_settings_are_validated(change, message):
    nodes = {"a": {"data_dir": "/a", "health_port": 8008}, "b": {"data_dir": "/b", "health_port": 8008}}
    with pytest.raises(ValueError, match=message):
        Replication(manager="patroni", nodes=nodes, **change)
    # under Patroni each node runs its own REST API, so the same port on every host is fine
    Replication(manager="patroni", nodes=nodes, patroni={"etcd_hosts": ["e:2379"]})
    with pytest.raises(ValueError, match="health_port"):
        Replication(nodes=nodes)


def _cluster(*members, pause=False):
    return {"members": [dict(zip(("name", "role", "state", "lag"), m)) for m in members], "pause": pause}


def test_the_synchronous_then_least_lagging_replica_is_chosen():
    cluster = _cluster(("a", "leader", "running", None), ("b", "replica", "streaming", 10),
                       ("c", "sync_standby", "streaming", 500), ("d", "replica", "stopped", 0))
    assert [m["name"] for m in _running_replicas(cluster)] == ["c", "b"]
    assert [m["name"] for m in _running_replicas(cluster, max_lag=100)] == ["b"]
    assert leader_of(cluster) == "a"


def test_patroni_problems():
    pair = SimpleNamespace(nodes=[SimpleNamespace(name=n) for n in "abc"],
                           settings=SimpleNamespace(synchronous_standby_names="*",
                                                    patroni=SimpleNamespace(scope="s")))
    found = dict((text, level) for level, text in problems(
        _cluster(("a", "replica", "running", 0), ("b", "replica", "stopped", None), pause=True), pair))
    assert found["Patroni has no leader: no member holds the leader lock"] == CRITICAL
    assert found["Patroni member b is stopped"] == CRITICAL
    assert found["c is not a Patroni member of s"] == CRITICAL
    assert any(level == WARNING and "paused" in text for text, level in found.items())
    healthy = _cluster(("a", "leader", "running", None), ("b", "sync_standby", "streaming", 0),
                       ("c", "replica", "streaming", 0))
    assert problems(healthy, pair) == []
    no_sync = _cluster(("a", "leader", "running", None), ("b", "replica", "streaming", 0),
                       ("c", "replica", "streaming", 0))
    assert [level for level, _ in problems(no_sync, pair)] == [WARNING]
