"""Fixtures shared by the replication and failover tests: a local primary/standby pair built by the
commands under test (a fresh primary, `setup-master`, then `rebuild-replica` from an empty directory)."""

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from dbdeck.run import Runner

from ..conftest import BIN, StartedPostgres, _start_postgres, wait_for


class LocalPair:
    def __init__(self, base, primary, standby_server, config_path, log_dir, password_file):
        self.base = base
        self.primary = primary                  # StartedPostgres
        self.standby_server = standby_server    # PostgresServer (same paths as the node's config)
        self.config = config_path
        self.log_dir = log_dir
        self.password_file = password_file
        self.names = ("alpha", "beta")

    def run(self, command, *args, env=None, timeout=180):
        return subprocess.run([str(BIN / command), "--config", str(self.config), *map(str, args)],
                              capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})

    def check(self, *args):
        result = self.run("check-replication", "--format", "json", *args)
        return result.returncode, json.loads(result.stdout), result

    def streams(self):
        """One node accepts writes and the other streams from it: plain SQL, cheap to poll."""
        for port in (self.alpha_port, self.beta_port):
            try:
                state = self.sql(port, "SELECT pg_is_in_recovery(), "
                                       "(SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming')")
            except Exception:
                continue
            if state == [(False, 1)]:
                return True
        return False

    def wait_healthy(self, timeout):
        """Until check-replication answers OK. Each check is a new dbdeck process, so it is asked only once
        SQL shows what it needs (a primary with a streaming standby); whatever SQL says, check-replication
        still decides, within the same time."""
        deadline = time.monotonic() + timeout
        wait_for(self.streams, timeout=timeout)
        return wait_for(lambda: self.check()[0] == 0, timeout=max(deadline - time.monotonic(), 5))

    def sql(self, port, statement, database="postgres"):
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", password=self.primary.password,
                             dbname=database, autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute(statement)
            return cur.fetchall() if cur.description else None

    @property
    def alpha_port(self):
        return self.primary.port

    @property
    def beta_port(self):
        return self.standby_server.port


def write_pair_config(path, base, primary, standby_port, password_file, log_dir, extra=None):
    node = lambda name, port, data, settings=None: {  # noqa: E731
        "endpoint": {"host": "127.0.0.1", "port": port, "user": "postgres", "password": primary.password,
                     "database": "postgres", "connect_timeout": 3},
        "driver": "local", "data_dir": str(data), "settings": settings or {},
        "app_address": f"127.0.0.1:{port}",
    }
    config = {
        "dbdeck": {"run_dir": str(base / "run"), "state_dir": str(base / "state")},
        "replication": {
            "nodes": {
                "alpha": node("alpha", primary.port, primary.server.datadir),
                "beta": node("beta", standby_port, base / "beta",
                             {"port": standby_port, "unix_socket_directories": str(base / "beta.run")}),
            },
            "primary": "alpha",
            "replication_password_file": str(password_file),
            "slot": "replica_slot",
            # 127.0.0.1 is in initdb's default pg_hba; 127.0.0.2 makes setup-master add a line
            "replication_networks": ["127.0.0.1/32", "127.0.0.2/32"],
            "log_dir": str(log_dir),
            "wait_timeout": 60,
            **(extra or {}),
        },
    }
    path.write_text(yaml.safe_dump(config))


def _pair_base(workdir, request):
    return workdir / f"rp{os.getpid() % 1000}{request.node.name[-12:].replace('[', '').replace(']', '')}"


def build_readme_pair(base):
    """alpha = a fresh primary with PostgreSQL's defaults; beta = its standby, built the README's way:
    setup-master --apply-settings, a restart of the primary, setup-master, rebuild-replica."""
    from dbdeck.plugins.sandbox.servers import PostgresServer, free_port, give_to

    give_to(base, None, 0o755)
    primary = _start_postgres(base, "alpha", stock=True)
    standby_port = free_port()
    give_to(base / "beta.run", primary.server.os_user, 0o700)
    give_to(base / "beta", primary.server.os_user, 0o700)  # an empty directory for the new standby
    standby_server = PostgresServer(base / "beta", standby_port, Runner(), socket_dir=base / "beta.run")
    pair = LocalPair(base, primary, standby_server, base / "dbdeck.yaml", base / "logs",
                     base / "secrets" / "replicator")
    write_pair_config(pair.config, base, primary, standby_port, pair.password_file, pair.log_dir)
    hba_before = Path(pair.sql(primary.port, "SHOW hba_file")[0][0]).read_text()
    dry = pair.run("setup-master", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "CREATE ROLE replicator WITH LOGIN REPLICATION PASSWORD '***'" in dry.stdout
    assert not pair.password_file.exists()
    assert pair.sql(primary.port, "SELECT count(*) FROM pg_roles WHERE rolname = 'replicator'") == [(0,)]
    assert pair.sql(primary.port, "SELECT count(*) FROM pg_replication_slots") == [(0,)]
    assert Path(pair.sql(primary.port, "SHOW hba_file")[0][0]).read_text() == hba_before
    applied = pair.run("setup-master", "--apply-settings")
    assert applied.returncode == 1 and "RESTART the primary for wal_log_hints" in applied.stderr, \
        applied.stdout + applied.stderr
    primary.server.stop()
    primary.server.start()
    setup = pair.run("setup-master")
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert pair.sql(primary.port, "SHOW wal_keep_size") == [("0",)], "the pair must run with the stock default"
    rebuild = pair.run("rebuild-replica")
    assert rebuild.returncode == 0, rebuild.stdout + rebuild.stderr
    return pair


def _destroy(pair):
    pair.standby_server.destroy()
    pair.primary.server.destroy()
    shutil.rmtree(pair.base, ignore_errors=True)


@pytest.fixture
def readme_pair(workdir, request):
    """A pair built the README's way for this test alone: for tests about that set-up itself."""
    pair = build_readme_pair(_pair_base(workdir, request))
    yield pair
    _destroy(pair)


@pytest.fixture(scope="session")
def readme_pair_template(workdir):
    """One README-built pair per test worker, stopped cleanly (the primary first, so the standby has its
    shutdown checkpoint): local_pair copies it instead of building a pair for every test."""
    pair = build_readme_pair(workdir / "pair-template")
    streaming = pair.sql(pair.alpha_port, "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")
    assert streaming == [(1,)], "the template's standby must stream before it is stopped"
    pair.primary.server.stop()
    pair.standby_server.stop()
    yield pair
    _destroy(pair)


_PORT_LINE = re.compile(r"^(\s*port\s*=\s*)'?(\d+)'?", re.M)
_CONNINFO_PORT = re.compile(r"\bport=((?:'')?)(\d+)((?:'')?)")  # -R writes port=N, dbdeck port=''N''



def copy_pair(template, base):
    """A private, running copy of the template pair under base: same clusters, new ports and paths."""
    from dbdeck.plugins.sandbox.servers import PostgresServer, free_port

    subprocess.run(["cp", "-a", str(template.base), str(base)], check=True)
    ports = {template.alpha_port: free_port(), template.beta_port: free_port()}
    old_base, new_base = str(template.base), str(base)

    def rewrite(path):
        text = path.read_text().replace(old_base, new_base)
        text = _PORT_LINE.sub(lambda m: f"{m.group(1)}{ports.get(int(m.group(2)), m.group(2))}", text)
        text = _CONNINFO_PORT.sub(lambda m: f"port={m.group(1)}{ports.get(int(m.group(2)), m.group(2))}{m.group(3)}",
                                  text)
        path.write_text(text)

    for node in ("alpha", "beta"):
        for name in ("postgresql.conf", "postgresql.auto.conf", "dbdeck-node.conf"):
            if (base / node / name).exists():
                rewrite(base / node / name)
    for path in (base / "state").rglob("*"):
        if path.is_file():
            rewrite(path)
    primary_server = PostgresServer(base / "alpha", ports[template.alpha_port], Runner(),
                                    socket_dir=base / "alpha.run")
    primary = StartedPostgres(primary_server, template.primary.password)
    standby_server = PostgresServer(base / "beta", ports[template.beta_port], Runner(), socket_dir=base / "beta.run")
    pair = LocalPair(base, primary, standby_server, base / "dbdeck.yaml", base / "logs",
                     base / "secrets" / "replicator")
    write_pair_config(pair.config, base, primary, standby_server.port, pair.password_file, pair.log_dir)
    primary_server.start()
    standby_server.start()
    streaming = "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
    assert wait_for(lambda: pair.sql(pair.alpha_port, streaming) == [(1,)], timeout=60), \
        "the copied standby does not stream: " + standby_server.log_path.read_text()[-2000:]
    return pair


@pytest.fixture
def local_pair(workdir, request, readme_pair_template):
    """alpha = a primary with PostgreSQL's defaults; beta = its streaming standby, built the README's way
    (see build_readme_pair) once per worker and copied for each test, so every test has its own pair."""
    pair = copy_pair(readme_pair_template, _pair_base(workdir, request))
    yield pair
    _destroy(pair)
