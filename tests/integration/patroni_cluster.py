"""A Patroni + etcd cluster on loopback built the README's way: one etcd member, three nodes on 127.0.0.2-4,
their configuration from `dbdeck patroni render`, each started as patroni@.service would start it (its
ExecStart as the postgres user, with env.conf as EnvironmentFile). Used by the tests and bench/ha_endpoint."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import yaml
from dotenv import dotenv_values

from dbdeck.plugins.sandbox.servers import free_port, give_to

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "bin"
TUNED = {"ttl": 10, "loop_wait": 2, "retry_timeout": 3}   # the README's "faster failover" settings


def _wait(check, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def start_etcd(base, client_port, peer_port):
    """A single etcd member on loopback (etcd-server's service is never started)."""
    log = open(Path(base) / "etcd.log", "w")
    process = subprocess.Popen(
        ["etcd", "--name", "e1", "--data-dir", str(Path(base) / "etcd"),
         "--listen-client-urls", f"http://127.0.0.1:{client_port}",
         "--advertise-client-urls", f"http://127.0.0.1:{client_port}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
         "--initial-cluster", f"e1=http://127.0.0.1:{peer_port}"], stdout=log, stderr=subprocess.STDOUT)

    def healthy():
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{client_port}/health", timeout=2) as response:
            return json.loads(response.read()).get("health") == "true"

    _wait(healthy, 30, "etcd")
    return process


def start_patroni(directory, name, log_path):
    """patroni@<name>.service: ExecStart=/usr/bin/patroni /etc/patroni/<name>.yml as User=postgres, with
    EnvironmentFile=/etc/patroni/env.conf (here: `directory`)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/var/lib/postgresql", "LANG": "C.UTF-8",
           **dotenv_values(Path(directory) / "env.conf")}
    return subprocess.Popen(["/usr/bin/patroni", str(Path(directory) / f"{name}.yml")], env=env, user="postgres",
                            group="postgres", extra_groups=[], cwd="/", stdout=open(log_path, "a"),
                            stderr=subprocess.STDOUT)


class PatroniCluster:
    def __init__(self, base, password, names=("n1", "n2", "n3"), patroni=None, synchronous=True):
        self.base, self.password, self.names = Path(base), password, list(names)
        self.synchronous = synchronous
        give_to(self.base / "pg", "postgres", 0o755)
        self.hosts = {name: f"127.0.0.{index + 2}" for index, name in enumerate(self.names)}
        self.ports = {name: free_port() for name in self.names}
        self.rest_ports = {name: free_port() for name in self.names}
        self.etcd_port, self.etcd_peer = free_port(), free_port()
        self.proxy = {"write_port": free_port(), "read_port": free_port()}
        self.config = self.base / "dbdeck.yaml"
        self.out = self.base / "patroni"
        self.processes, self.etcd, self.haproxy = {}, None, None
        node = lambda name: {  # noqa: E731
            "endpoint": {"host": self.hosts[name], "port": self.ports[name], "user": "postgres",
                         "password": password, "database": "postgres", "connect_timeout": 3},
            "data_dir": str(self.base / "pg" / name), "health_port": self.rest_ports[name],
            "settings": {"unix_socket_directories": str(self.base / "pg")}}
        self.config.write_text(yaml.safe_dump({
            "dbdeck": {"run_dir": str(self.base / "run"), "state_dir": str(self.base / "state"),
                       "log_dir": str(self.base / "logs")},
            "replication": {
                "manager": "patroni",
                "nodes": {name: node(name) for name in self.names},
                "replication_networks": ["127.0.0.0/8"],
                "synchronous_standby_names": "*" if synchronous else None,
                "patroni": {"scope": f"t{os.getpid()}", "etcd_hosts": [f"127.0.0.1:{self.etcd_port}"],
                            **(patroni or {})},
                "haproxy": dict(self.proxy),
                "wait_timeout": 90,
            }}))

    # --- dbdeck -------------------------------------------------------------------------------------
    def run(self, *args, timeout=180):
        return subprocess.run([str(BIN / "dbdeck"), "--config", str(self.config), *map(str, args)],
                              capture_output=True, text=True, timeout=timeout)

    def check(self):
        result = self.run("--format", "json", "check-replication")
        return result.returncode, json.loads(result.stdout)

    # --- processes -----------------------------------------------------------------------------------
    def start_etcd(self):
        self.etcd = start_etcd(self.base, self.etcd_port, self.etcd_peer)

    def render(self, *args):
        result = self.run("patroni", "render", "--output", self.out, *args)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    def start(self, name):
        self.processes[name] = start_patroni(self.out, name, self.base / f"patroni-{name}.log")

    def start_all(self):
        for name in self.names:
            self.start(name)
        self.wait_healthy()

    def settled_leader(self):
        """The one node that accepts writes while every other streams from it (synchronously, if so
        configured), seen with plain SQL: cheap enough to poll, where each dbdeck check is a new process."""
        leaders = []
        for name in self.names:
            try:
                row = self.sql(name, "SELECT pg_is_in_recovery(), count(*) FILTER (WHERE state = 'streaming'), "
                                     "count(*) FILTER (WHERE sync_state = 'sync') FROM pg_stat_replication")[0]
            except Exception:
                continue
            in_recovery, streaming, synchronous = row
            if not in_recovery:
                leaders.append((name, streaming, synchronous))
        if len(leaders) != 1:
            return None
        name, streaming, synchronous = leaders[0]
        if streaming != len(self.names) - 1 or (self.synchronous and not synchronous):
            return None
        return name

    def wait_healthy(self, timeout=120):
        deadline = time.monotonic() + timeout
        _wait(self.settled_leader, timeout, "one writable node with every other streaming from it")

        def ok():
            code, report = self.check()
            return code == 0 and len([s for s in report["standbys"] if s["state"] == "streaming"]) == \
                len(self.names) - 1

        _wait(ok, max(deadline - time.monotonic(), 10), "the cluster to be healthy")
        return self.check()[1]["primary"]

    def start_haproxy(self):
        log = open(self.base / "haproxy.log", "w")
        self.haproxy = subprocess.Popen(["/usr/sbin/haproxy", "-db", "-f", str(self.out / "haproxy.cfg")],
                                        stdout=log, stderr=subprocess.STDOUT)

    def postmaster_pid(self, name):
        return int((self.base / "pg" / name / "postmaster.pid").read_text().split()[0])

    def kill_node(self, name):
        """The whole node: its Patroni process and its postmaster, both SIGKILL."""
        postmaster = self.postmaster_pid(name)
        self.processes[name].send_signal(signal.SIGKILL)
        os.kill(postmaster, signal.SIGKILL)
        self.processes[name].wait(timeout=10)

    def sql(self, name, statement):
        import psycopg

        with psycopg.connect(host=self.hosts[name], port=self.ports[name], user="postgres", password=self.password,
                             dbname="postgres", connect_timeout=3, autocommit=True) as conn:
            cursor = conn.execute(statement)
            return cursor.fetchall() if cursor.description else None

    def through(self, which, statement):
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.proxy[which], user="postgres", password=self.password,
                             dbname="postgres", connect_timeout=3, autocommit=True) as conn:
            return conn.execute(statement).fetchall()

    def stop(self):
        if self.haproxy:
            self.haproxy.terminate()
            self.haproxy.wait(timeout=10)
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
        for name in self.names:  # a postmaster left by a killed Patroni
            try:
                os.kill(self.postmaster_pid(name), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        if self.etcd:
            self.etcd.terminate()
            self.etcd.wait(timeout=20)
