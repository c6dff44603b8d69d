"""--format json: every command and subcommand, found by walking the click tree (a command added later is
covered the day it is added), writes exactly one JSON document on stdout, and its messages on stderr.

Run here in the forms that cannot change this machine: --dry-run against servers that do not answer, and
--dry-run with a config that does not parse. The walk calls the same run_command the executables call, in
this process (94 runs take a second, against 40 s of CPU as 94 processes); bin/dbdeck itself is run below.
(The sandbox-backed plain runs are the integration tests'.)"""

import contextlib
import io
import json
import subprocess
from pathlib import Path

import click
import pytest

from tests.conftest import first_json_document

ROOT = Path(__file__).resolve().parents[2]
# services run until stopped: they are checked elsewhere (their dry runs still serve)
SERVICES = {"auto-failover", "local-sync watch", "schedule run", "webhook-relay"}  # see the last test
# commands that read no config file, so a broken one cannot fail them
NO_CONFIG = {"plugins", "sandbox up", "sandbox down", "sandbox status"}


def _commands():
    from dbdeck.cli import build_cli

    root = build_cli()
    context = click.Context(root)

    def walk(command, path):
        if isinstance(command, click.Group):
            if path and command.invoke_without_command:
                yield path, command
            for name in command.list_commands(context):
                yield from walk(command.get_command(context, name), [*path, name])
        else:
            yield path, command

    return list(walk(root, []))


def _arguments(command, tmp_path):
    """Values for a command's required arguments (a file to restore, a job name, a target directory)."""
    values = {"file": str(tmp_path / "backup.sql.gz"), "name": "nightly", "target": str(tmp_path / "restore"),
              "env": "staging"}
    return [values.get(p.name, "x") for p in command.params if isinstance(p, click.Argument) and p.required]


def _config(tmp_path):
    unreachable = {"host": "127.0.0.1", "port": 1, "user": "nobody", "database": "nothing", "connect_timeout": 1}
    node = lambda name: {"endpoint": unreachable, "driver": "local",  # noqa: E731
                         "data_dir": str(tmp_path / name)}
    config = {
        "dbdeck": {"state_dir": str(tmp_path / "state"), "run_dir": str(tmp_path / "run")},
        "scheduler": {"state_dir": str(tmp_path / "scheduler"), "cron_file": None},
        "schedules": {"nightly": {"command": ["true"], "every": "1h"}},
        "sync_prod_to_dev": {"source": unreachable, "target": {**unreachable, "database": "dev"}},
        "sync_databases": {"local": unreachable, "external": unreachable},
        "local_sync": {"source": unreachable, "instances": [{"name": "acme", "target": {
            **unreachable, "kind": "mysql"}}]},
        "replication": {"nodes": {"alpha": node("alpha"), "beta": node("beta")},
                        "replication_password_file": str(tmp_path / "replicator.pw"),
                        "log_dir": str(tmp_path / "logs")},
    }
    path = tmp_path / "dbdeck.yaml"
    path.write_text(json.dumps(config))
    broken = tmp_path / "broken.yaml"
    broken.write_text("sync_prod_to_dev: [unclosed\n")
    return path, broken


def _run(path, command, config, tmp_path):
    from dbdeck.cli import build_cli, run_command

    args = ["--config", str(config), "--format", "json", "--dry-run", *path, *_arguments(command, tmp_path)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_command(build_cli(), args, prog_name="dbdeck")
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_every_command_writes_one_json_document_in_its_dry_run_and_failing_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    config, broken = _config(tmp_path)
    commands = [(path, command) for path, command in _commands() if " ".join(path) not in SERVICES]
    assert len(commands) > 40, [" ".join(p) for p, _ in commands]
    runs = [(path, command, which) for path, command in commands for which in (config, broken)]
    results = [_run(path, command, which, tmp_path) for path, command, which in runs]
    wrong = []
    for (path, _, which), result in zip(runs, results):
        try:
            document = json.loads(result.stdout)
        except ValueError:
            wrong.append((" ".join(path), which.name, result.returncode, result.stdout[:300], result.stderr[-300:]))
            continue
        if isinstance(document, dict) and "error" in document and (
                document["exit_code"] != result.returncode or "\n" in document["error"]):
            wrong.append((" ".join(path), which.name, "error document", document))
        if which == broken and result.returncode == 0 and " ".join(path) not in NO_CONFIG:
            wrong.append((" ".join(path), which.name, "succeeded with a config that does not parse", document))
    assert not wrong, "\n".join(map(str, wrong))


def test_a_dry_runs_steps_and_a_passed_through_program_stay_off_stdout(tmp_path, monkeypatch, capfd):
    """What a command says and what a program it runs prints (passthrough) are messages: stderr, and listed in
    the closing document; stdout is the one document."""
    import click

    from dbdeck.cli import pass_app, run_command

    @click.command("talk")
    @pass_app
    def talk(app):
        click.echo("a step a plugin printed")
        app.runner.run(["echo", "from a program"], passthrough=True)
        app.runner.run(["touch", str(tmp_path / "never")])

    from dbdeck.cli import _with_global_options

    code = run_command(_with_global_options(talk), ["--format", "json"], prog_name="talk")
    out, err = capfd.readouterr()
    assert code == 0 and json.loads(out)["messages"] == ["a step a plugin printed"], (out, err)
    assert "from a program" in err and (tmp_path / "never").exists()
    code = run_command(_with_global_options(talk), ["--format", "json", "--dry-run"], prog_name="talk")
    out, err = capfd.readouterr()
    document = json.loads(out)
    assert code == 0 and document["dry_run"] is True and len(document["messages"]) == 3, document
    assert document["messages"][1].startswith("[dry-run] would run: echo"), document


@pytest.mark.parametrize("args", [["plugins"], ["config", "check"]])
def test_a_command_without_a_document_of_its_own_still_ends_with_one(tmp_path, args):
    config, _ = _config(tmp_path)
    result = subprocess.run([str(ROOT / "bin" / "dbdeck"), "--config", str(config), "--format", "json", *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    json.loads(result.stdout)


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("service", ["status", "check-replication", "webhook-relay", "schedule run"])
def test_a_service_writes_one_document_saying_what_it_serves_then_serves(tmp_path, service):
    import signal
    import urllib.request

    config, _ = _config(tmp_path)
    port = _free_port()
    args = {"status": ["status", "--serve", f"127.0.0.1:{port}"],
            "check-replication": ["check-replication", "--serve", f"127.0.0.1:{port}"],
            "webhook-relay": ["webhook-relay", "--listen", f"127.0.0.1:{port}", "--primary", "http://127.0.0.1:9/",
                              "--no-mirror"],
            "schedule run": ["schedule", "run"]}[service]
    process = subprocess.Popen([str(ROOT / "bin" / "dbdeck"), "--config", str(config), "--format", "json", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        document = first_json_document(process)
        assert document is not None, process.stderr.read() if process.poll() is not None else "no document"
        assert document["pid"] == process.pid and document["service"], document
        if service == "schedule run":
            assert document["jobs"]["nightly"] == "every 1h", document
        else:
            assert str(port) in json.dumps(document), document
            path = document.get("health", "/metrics")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
                assert response.status == 200  # serving once it said so
    finally:
        process.send_signal(signal.SIGTERM)
        rest, errors = process.communicate(timeout=30)
    assert process.returncode == 0, errors
    assert rest == "", f"a second document after the first: {rest!r}"
