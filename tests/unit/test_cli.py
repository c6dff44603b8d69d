import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import default_signals

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("psycopg", "pymysql", "pydantic", "yaml", "sh",
         "dbdeck.plugins.sandbox.sandbox", "dbdeck.plugins.sandbox.servers", "dbdeck.config", "dbdeck.endpoints")


def run(*args, env=None, cwd=None):
    return subprocess.run([str(ROOT / "bin" / "dbdeck"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd or ROOT, timeout=60)


def imported_by(args):
    code = textwrap.dedent(f"""
        import sys
        from dbdeck.cli import main
        try:
            main({args!r})
        except SystemExit:
            pass
        print(",".join(sorted(sys.modules)), file=sys.stderr)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return set(done.stderr.strip().splitlines()[-1].split(","))


def test_help_and_version_stay_light():
    for args in (["--help"], ["--version"]):
        loaded = imported_by(args)
        assert not loaded.intersection(HEAVY), f"{args} imported {sorted(loaded.intersection(HEAVY))}"


def test_version():
    done = run("--version")
    assert done.returncode == 0 and done.stdout.startswith("dbdeck 0.")


def test_help_lists_plugin_commands():
    done = run("--help")
    assert done.returncode == 0 and "sandbox" in done.stdout and "plugins" in done.stdout


def test_global_options_before_or_after_the_command(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("endpoints: {}\n")
    for args in (["--config", str(cfg), "--format", "json", "config", "check"],
                 ["config", "check", "--config", str(cfg), "--format", "json"]):
        done = run(*args)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["file"] == str(cfg)


def test_bad_config_exits_2_with_one_line_and_runs_nothing(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("endpoints:\n  prod:\n    port: not-a-port\n")
    done = run("--config", str(cfg), "endpoints")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert f"{cfg}:3: endpoints.prod.port: Input should be a valid integer" in done.stderr
    assert done.stdout == ""


def test_config_from_environment_variable(tmp_path):
    cfg = tmp_path / "env.yaml"
    cfg.write_text("dbdeck: {unknown_key: 1}\n")
    done = run("config", "check", env={"DBDECK_CONFIG": str(cfg)})
    assert done.returncode == 2 and "dbdeck.unknown_key: unknown key" in done.stderr


def test_config_show_masks_secrets(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("endpoints:\n  ext:\n    dsn: postgresql://app:show-me-not@db.example/app\n")
    done = run("--config", str(cfg), "config", "show")
    assert done.returncode == 0 and "show-me-not" not in done.stdout and "ext" in done.stdout


def test_unknown_command_is_a_usage_error():
    done = run("no-such-command")
    assert done.returncode == 2 and "No such command" in done.stderr


def test_main_for_gives_a_command_its_own_executable(tmp_path):
    launcher = [sys.executable, "-m", "dbdeck.launch", "sandbox", "status", "--dir", str(tmp_path / "none"),
                "--format", "json"]
    done = subprocess.run(launcher, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert json.loads(done.stdout) == {"dir": str(tmp_path / "none"), "servers": []}
    missing = subprocess.run([sys.executable, "-m", "dbdeck.launch", "not-a-command"], capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and "no command 'not-a-command'" in missing.stderr


def test_third_party_plugin_from_entry_point(tmp_path):
    site = tmp_path / "site"
    (site / "dbdeck_hello").mkdir(parents=True)
    (site / "dbdeck_hello" / "__init__.py").write_text(textwrap.dedent("""
        import click
        from dbdeck.hookspecs import hookimpl

        @hookimpl
        def register_commands(cli):
            @cli.command("hello")
            def hello():
                "Say hello from a third-party plugin."
                click.echo("hello from a plugin")
    """))
    dist = site / "dbdeck_hello-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dbdeck-hello\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text("[dbdeck.plugins]\nhello = dbdeck_hello\n")
    env = {"PYTHONPATH": str(site)}
    listed = run("plugins", "--format", "json", env=env)
    assert listed.returncode == 0, listed.stderr
    hello = [p for p in json.loads(listed.stdout) if p["module"] == "dbdeck_hello"]
    assert hello and hello[0]["version"] == "1.2.3" and hello[0]["hooks"] == ["register_commands"]
    done = run("hello", env=env)
    assert done.returncode == 0 and done.stdout == "hello from a plugin\n"


def test_dry_run_flag_reaches_the_runner(tmp_path):
    code = textwrap.dedent("""
        import click, sys
        from dbdeck.cli import pass_app, run_command, _with_global_options

        @click.command("touch-it")
        @click.argument("path")
        @pass_app
        def touch_it(app, path):
            app.runner.run(["touch", path])

        sys.exit(run_command(_with_global_options(touch_it), sys.argv[1:], prog_name="touch-it"))
    """)
    target = tmp_path / "file"
    done = subprocess.run([sys.executable, "-c", code, str(target), "--dry-run"], capture_output=True, text=True)
    assert done.returncode == 0 and not target.exists()
    assert done.stdout.strip() == f"[dry-run] would run: touch {target}"
    subprocess.run([sys.executable, "-c", code, str(target)], check=True)
    assert target.exists()


def _command_that_fails(tmp_path, body):
    return textwrap.dedent(f"""
        import click, sys
        from dbdeck import secrets
        from dbdeck.cli import pass_app, run_command, _with_global_options

        @click.command("fail-it")
        @pass_app
        def fail_it(app):
            secrets.register("hunter2-secret")
{textwrap.indent(textwrap.dedent(body), " " * 12)}
        sys.exit(run_command(_with_global_options(fail_it), sys.argv[1:], prog_name="fail-it"))
    """)


def test_unexpected_exception_is_one_masked_line_and_exit_1(tmp_path):
    code = _command_that_fails(tmp_path, """
        raise RuntimeError("boom while using hunter2-secret\\nsecond line")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("fail-it: error: RuntimeError: boom while using ***") and "-vv" in lines[0]
    assert "hunter2" not in done.stderr and "Traceback" not in done.stderr
    verbose = subprocess.run([sys.executable, "-c", code, "-vv"], capture_output=True, text=True, timeout=60)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr and "fail_it" in verbose.stderr
    assert "hunter2" not in verbose.stderr


def test_closed_stdout_ends_quietly(tmp_path):
    code = _command_that_fails(tmp_path, """
        for n in range(100000):
            click.echo(f"line {n}")
    """)
    reader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader.stdout.readline()
    reader.stdout.close()
    stderr = reader.stderr.read().decode()
    assert reader.wait(timeout=60) == 1
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "Exception ignored" not in stderr


def test_out_of_range_numbers_are_refused_not_replaced(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("endpoints: {}\n")
    negative = run("check-replication", "--config", str(cfg), "--crit-lag-seconds", "-5")
    assert negative.returncode == 3 and "REPLICATION UNKNOWN" in negative.stdout and "-5" in negative.stdout
    zero = run("auto-failover", "--config", str(cfg), "--interval", "0")
    assert zero.returncode == 2 and "--interval" in zero.stderr


def test_failures_with_format_json_are_one_json_document_on_stdout(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("endpoints:\n  prod: {port: notaport}\n")
    bad_config = run("--format", "json", "--config", str(cfg), "config", "check")
    assert bad_config.returncode == 2
    document = json.loads(bad_config.stdout)
    assert document["exit_code"] == 2 and "endpoints.prod.port" in document["error"]
    cfg.write_text("endpoints: {}\n")
    unknown = run("endpoints", "nosuch", "--config", str(cfg), "--format=json")
    assert unknown.returncode != 0 and json.loads(unknown.stdout)["exit_code"] == unknown.returncode
    usage = run("sync-prod-to-dev", "--no-such-flag", "--format", "json")
    assert usage.returncode == 2 and json.loads(usage.stdout)["exit_code"] == 2
    assert "--no-such-flag" in json.loads(usage.stdout)["error"]
    fine = run("--format", "json", "--config", str(cfg), "config", "check")
    assert fine.returncode == 0 and "error" not in json.loads(fine.stdout)


def _on_a_terminal(args, answer, tmp_path):
    """Run a command with a real terminal (a pty) as stdin/stdout, answering its question."""
    import pty
    import select

    leader, follower = pty.openpty()
    process = subprocess.Popen([str(ROOT / "bin" / args[0]), *args[1:]], stdin=follower, stdout=follower,
                               stderr=follower, cwd=tmp_path, close_fds=True)
    os.close(follower)
    seen, answered = b"", False
    while process.poll() is None or select.select([leader], [], [], 0.2)[0]:
        if select.select([leader], [], [], 0.2)[0]:
            try:
                chunk = os.read(leader, 1024)
            except OSError:
                break
            seen += chunk
            if not answered and b"[y/N]" in seen:
                os.write(leader, answer)
                answered = True
    process.wait(timeout=30)
    os.close(leader)
    return process.returncode, seen.decode(errors="replace")


def test_role_changes_ask_on_a_terminal_and_never_without_one(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("endpoints: {}\n")
    for command in ("switchover", "promote-replica", "rebuild-replica"):
        code, seen = _on_a_terminal([command, "--config", str(cfg)], b"n\n", tmp_path)
        assert code == 1 and "[y/N]" in seen and "Aborted" in seen, seen
        assert "replication" not in seen.split("[y/N]")[1]  # nothing ran after the refusal
        code, seen = _on_a_terminal([command, "--config", str(cfg), "--yes"], b"", tmp_path)
        assert "[y/N]" not in seen and code != 0  # went on, to the missing replication config
        piped = run(command, "--config", str(cfg))
        assert "[y/N]" not in piped.stdout + piped.stderr and piped.returncode != 0


def test_shell_completion_as_the_readme_installs_it():
    source = run(env={"_DBDECK_COMPLETE": "bash_source"})
    assert source.returncode == 0 and "_dbdeck_completion" in source.stdout
    done = run(env={"_DBDECK_COMPLETE": "bash_complete", "COMP_WORDS": "dbdeck sync-p", "COMP_CWORD": "1"})
    assert done.stdout.split() == ["plain,sync-prod-to-dev"]
    options = subprocess.run([str(ROOT / "bin" / "sync-prod-to-dev")], capture_output=True, text=True, env={
        **os.environ, "_SYNC_PROD_TO_DEV_COMPLETE": "bash_complete", "COMP_WORDS": "sync-prod-to-dev --fo",
        "COMP_CWORD": "1"}, timeout=60)
    assert set(options.stdout.split()) == {"plain,--force", "plain,--format"}


def test_ctrl_c_and_sigterm_stop_the_program_and_exit_at_once(tmp_path):
    import signal
    import time

    code = textwrap.dedent("""
        import click, sys
        from dbdeck.cli import pass_app, run_command, _with_global_options

        @click.command("wait-long")
        @pass_app
        def wait_long(app):
            app.runner.run(["sleep", "60"], timeout=120)

        sys.exit(run_command(_with_global_options(wait_long), sys.argv[1:], prog_name="wait-long"))
    """)
    for signum, expected, said in ((signal.SIGINT, 130, "Interrupted."), (signal.SIGTERM, 143, "Terminated.")):
        process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, preexec_fn=default_signals)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and subprocess.run(["pgrep", "-P", str(process.pid)],
                                                             capture_output=True).returncode != 0:
            time.sleep(0.05)
        started = time.monotonic()
        process.send_signal(signum)
        _, err = process.communicate(timeout=30)
        assert process.returncode == expected and said in err and "Traceback" not in err, err
        assert time.monotonic() - started < 10  # not the 60 s of the program, nor sh's timer


def test_a_sigterm_after_the_work_is_over_keeps_the_exit_status(tmp_path):
    """Python puts back SIGTERM's default action while it shuts down: a signal then (a supervisor's stop
    racing the end of a run) must not turn a finished run into a killed one (-15)."""
    import signal

    code = textwrap.dedent("""
        import atexit, click, os, signal, sys, time
        from dbdeck.cli import pass_app, run_command, _with_global_options

        @click.command("finish")
        @pass_app
        def finish(app):
            pass

        # what the interpreter's shutdown does to the handler, then the signal lands
        atexit.register(lambda: (signal.signal(signal.SIGTERM, signal.SIG_DFL), os.kill(os.getpid(), signal.SIGTERM),
                                 time.sleep(0.2)))
        sys.exit(run_command(_with_global_options(finish), sys.argv[1:], prog_name="finish"))
    """)
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert process.returncode == 0, (process.returncode, process.stderr)
    assert process.returncode != -signal.SIGTERM


def test_a_dry_run_in_json_keeps_stdout_to_the_one_document(tmp_path):
    import json

    config = tmp_path / "c.yaml"
    config.write_text(f"dbdeck: {{run_dir: {tmp_path}/run, state_dir: {tmp_path}/state}}\n"
                      f"scheduler: {{backend: cron, cron_file: {tmp_path}/cron}}\n"
                      "schedules:\n  hello: {command: [sandbox, status], every: 5m}\n")
    done = run("--config", str(config), "schedule", "install", "--dry-run", "--format", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["dry_run"] is True
    assert "[dry-run] would write" in done.stderr and not (tmp_path / "cron").exists()


_BROKEN_PLUGIN = textwrap.dedent('''
    from dbdeck.hookspecs import hookimpl

    @hookimpl
    def status_report(app):
        raise RuntimeError("status exploded")

    @hookimpl
    def scheduled_jobs(config):
        raise RuntimeError("jobs exploded")

    @hookimpl
    def history_entries(app):
        raise KeyError("history exploded")

    @hookimpl
    def notify(event, config):
        raise RuntimeError("notify exploded")
''')


def _install_broken_plugin(tmp_path):
    """A third-party plugin as an outside author ships one: a module and a dist-info with the entry point."""
    site = tmp_path / "site"
    (site / "dbdeck_broken").mkdir(parents=True)
    (site / "dbdeck_broken" / "__init__.py").write_text(_BROKEN_PLUGIN)
    dist = site / "dbdeck_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dbdeck-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[dbdeck.plugins]\nbroken = dbdeck_broken\n")
    config = tmp_path / "dbdeck.yaml"
    config.write_text(json.dumps({"dbdeck": {"state_dir": str(tmp_path / "state"), "run_dir": str(tmp_path / "run")},
                                  "scheduler": {"state_dir": str(tmp_path / "scheduler")},
                                  "schedules": {"nightly": {"command": ["true"], "every": "1h"}}}))
    return {"PYTHONPATH": str(site)}, config


def test_a_plugin_whose_hooks_raise_is_one_row_and_the_others_still_answer(tmp_path):
    env, config = _install_broken_plugin(tmp_path)
    status = run("--config", str(config), "status", "--format", "json", env=env)
    assert status.returncode == 1, status.stdout + status.stderr
    rows = json.loads(status.stdout)
    failing = {row["detail"] for row in rows if row["kind"] == "plugin" and row["name"] == "dbdeck_broken"}
    assert failing == {"plugin dbdeck_broken: its status_report hook failed: RuntimeError: status exploded",
                       "plugin dbdeck_broken: its scheduled_jobs hook failed: RuntimeError: jobs exploded"}, rows
    assert [row["name"] for row in rows if row["kind"] == "job"] == ["nightly"], rows
    assert "Traceback" not in status.stderr

    listed = run("--config", str(config), "schedule", "status", env=env)
    assert listed.returncode == 1 and "nightly" in listed.stdout, listed.stdout + listed.stderr
    assert "plugin dbdeck_broken: its scheduled_jobs hook failed" in listed.stderr

    history = run("--config", str(config), "history", "--format", "json", env=env)
    assert history.returncode == 1 and json.loads(history.stdout) == [], history.stdout + history.stderr
    assert "plugin dbdeck_broken: its history_entries hook failed: KeyError: 'history exploded'" in history.stderr
    assert len([line for line in history.stderr.splitlines() if "dbdeck_broken" in line]) == 1

    # without it, the same host is healthy: the failures above were the plugin's alone
    assert run("--config", str(config), "status", "--format", "json").returncode == 0


def test_a_notify_hook_that_raises_does_not_stop_the_other_deliveries(tmp_path, caplog):
    import logging
    import types

    from dbdeck.app import App
    from dbdeck.events import Event
    from dbdeck.pluginmanager import make_manager

    broken = types.ModuleType("dbdeck_broken")
    exec(_BROKEN_PLUGIN, broken.__dict__)
    delivered = tmp_path / "delivered.json"
    config = tmp_path / "dbdeck.yaml"
    config.write_text(json.dumps({"dbdeck": {"state_dir": str(tmp_path / "state")},
                                  "notify": {"command": ["sh", "-c", f"cat > {delivered}"]}}))
    app = App()
    app.config_path = str(config)
    app._manager = make_manager(load_entry_points=False)
    app._manager.register(broken, name="dbdeck_broken")
    with caplog.at_level(logging.WARNING):
        app.notify(Event("deploy.rolled_back", "staging rolled back", severity="warning"))
    assert json.loads(delivered.read_text())["kind"] == "deploy.rolled_back"  # the built-in plugin delivered
    assert [r.getMessage() for r in caplog.records if "dbdeck_broken" in r.getMessage()] == [
        "plugin dbdeck_broken: its notify hook failed: RuntimeError: notify exploded "
        "(event deploy.rolled_back not delivered there)"]
