"""The commands each node driver issues, with the Runner faked at its boundary (recording argv).

The local and docker drivers also run for real in tests/integration/test_replication*.py; systemd cannot
run in the test machines, so its commands are checked here."""

import os
from pathlib import Path

from dbdeck.plugins.replication.model import NodeConfig
from dbdeck.plugins.replication.nodes import DockerDriver, LocalDriver, SystemdDriver
from dbdeck.run import Result


class RecordingRunner:
    dry_run = False

    def __init__(self, answers=None):
        self.calls = []
        self.answers = answers or {}

    def run(self, argv, **kwargs):
        argv = [str(a) for a in argv]
        self.calls.append((argv, kwargs))
        for prefix, result in self.answers.items():
            if " ".join(argv).startswith(prefix):
                return result
        return Result(argv=argv)


def test_systemd_driver_commands(tmp_path):
    runner = RecordingRunner({"systemctl is-active": Result(argv=[], returncode=3)})
    driver = SystemdDriver("a", NodeConfig(driver="systemd", unit="postgresql@15-main",
                                           data_dir=tmp_path / "main", bindir=tmp_path), runner)
    assert driver.is_running() is False
    driver.start()
    driver.stop("immediate")
    argvs = [" ".join(argv) for argv, _ in runner.calls]
    assert argvs == ["systemctl is-active --quiet postgresql@15-main", "systemctl start postgresql@15-main",
                     "systemctl kill --kill-whom=main --signal=SIGQUIT postgresql@15-main",
                     "systemctl stop postgresql@15-main"]
    driver.shell('echo "$1"', "x", env={"PGPASSWORD": "p"})
    argv, kwargs = runner.calls[-1]
    assert argv == ["sh", "-c", 'echo "$1"', "sh", "x"] and kwargs["env"] == {"PGPASSWORD": "p"}
    assert driver.tool("pg_basebackup") == str(tmp_path / "pg_basebackup")


def test_docker_driver_offline_shell_uses_a_helper_with_the_nodes_volumes_and_network():
    import json

    inspect = Result(argv=[], stdout=json.dumps([{"Config": {"Image": "postgres:15", "Env": ["PGDATA=/pg/data"]},
                                                  "HostConfig": {"NetworkMode": "conecta_default"}}]))
    runner = RecordingRunner({"docker inspect --type container": inspect})
    driver = DockerDriver("r", NodeConfig(driver="docker", container="conecta-postgres-replica"), runner)
    assert driver.data_dir == "/pg/data"
    driver.shell("true", env={"PGPASSWORD": "secret"}, offline=True)
    argv, kwargs = runner.calls[-1]
    assert argv[:12] == ["docker", "run", "--rm", "-i", "--volumes-from", "conecta-postgres-replica",
                         "--network", "conecta_default", "-u", "postgres", "-e", "PGPASSWORD"]
    assert "secret" not in " ".join(argv) and kwargs["env"] == {"PGPASSWORD": "secret"}
    driver.shell("true")
    assert runner.calls[-1][0][:6] == ["docker", "exec", "-i", "-u", "postgres", "conecta-postgres-replica"]


def test_local_driver_stops_with_pg_ctl_mode(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "PG_VERSION").write_text("15\n")
    runner = RecordingRunner()
    driver = LocalDriver("a", NodeConfig(driver="local", data_dir=tmp_path / "data", bindir=Path("/pg/bin"),
                                         os_user="postgres"), runner)
    driver.stop("fast", timeout=5)
    assert runner.calls == []  # no postmaster.pid: nothing runs, nothing to stop
    (tmp_path / "data" / "postmaster.pid").write_text(f"{os.getpid()}\n")  # a live postmaster
    driver.stop("fast", timeout=5)
    stop = runner.calls[-1]
    assert stop[0] == ["/pg/bin/pg_ctl", "-D", str(tmp_path / "data"), "-m", "fast", "-w", "-t", "5", "stop"]
    assert stop[1]["as_user"] == "postgres"
