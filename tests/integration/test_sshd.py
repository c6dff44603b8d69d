import subprocess

import pytest

from dbdeck.run import Runner

pytestmark = pytest.mark.integration


def test_ssh_command_on_loopback(sshd):
    result = Runner().run(sshd.ssh_argv("echo", "deploy-ok"))
    assert result.stdout == "deploy-ok\n"


def test_rsync_over_ssh(sshd, tmp_path, workdir):
    source = tmp_path / "app"
    (source / "src").mkdir(parents=True)
    (source / "src" / "main.ts").write_text("console.log('hi')\n")
    (source / ".env").write_text("SECRET=never-copied\n")
    target = workdir / "deploy-target"
    ssh = " ".join(sshd.ssh_argv()[:-1])
    Runner().run(["rsync", "-a", "--exclude", ".env", "-e", ssh, f"{source}/", f"{sshd.user}@127.0.0.1:{target}/"])
    assert (target / "src" / "main.ts").read_text() == "console.log('hi')\n"
    assert not (target / ".env").exists()


def test_unknown_host_key_is_refused(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    argv = [a if not a.startswith("UserKnownHostsFile=") else f"UserKnownHostsFile={empty}" for a in sshd.ssh_argv("true")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    assert done.returncode != 0 and "Host key verification failed" in done.stderr
