"""The `dbdeck` command line: root group, global options, per-command executables.

Global options (--config, --dry-run, -v/--verbose, --format) are accepted at every level:
``dbdeck --dry-run sync-prod-to-dev``, ``dbdeck sync-prod-to-dev --dry-run`` and the drop-in
executable ``sync-prod-to-dev --dry-run`` all mean the same. Configuration is loaded on first use,
so --help and --version never import psycopg, pymysql or a plugin's internals.
"""

import json
import logging
import os
import signal
import sys
import threading

import click

from . import __version__, output, secrets
from .app import App
from .errors import EXIT_FAILED, EXIT_USAGE, DbdeckError, Terminated

log = logging.getLogger("dbdeck")


pass_app = click.make_pass_decorator(App, ensure=True)


def _set(attribute, transform=lambda v: v):
    def callback(ctx, param, value):
        if value in (None, False, 0, ()):
            return
        app = ctx.ensure_object(App)
        if attribute == "verbosity":
            app.verbosity += value
            from . import log as log_module

            log_module.setup(app.verbosity)
        else:
            setattr(app, attribute, transform(value))

    return callback


def global_options():
    """Fresh Option objects for one command (click params must not be shared between commands)."""
    return [
        click.Option(["--config", "-c"], metavar="FILE", expose_value=False, callback=_set("config_path"),
                     help="Config file (default: $DBDECK_CONFIG, ./etc/dbdeck.yaml, /etc/dbdeck/dbdeck.yaml)."),
        click.Option(["--no-config"], is_flag=True, expose_value=False, callback=_set("config_path", lambda v: False),
                     help="Use no config file (defaults and environment variables only), whatever exists."),
        click.Option(["--dry-run", "-n"], is_flag=True, expose_value=False, callback=_set("dry_run"),
                     help="Print every step and command instead of changing anything."),
        click.Option(["--verbose", "-v"], count=True, expose_value=False, callback=_set("verbosity"),
                     help="More log output (-vv for debug, including each command run)."),
        click.Option(["--format", "output_format"], type=click.Choice(["text", "json"]), expose_value=False,
                     callback=_set("format"), help="Output format for results and status."),
    ]


def _with_global_options(command):
    taken = {opt for p in command.params for opt in getattr(p, "opts", [])}
    for option in global_options():
        if not taken.intersection(option.opts):
            command.params.append(option)
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _with_global_options(sub)
    return command


class PluginGroup(click.Group):
    """The root group; plugins register their commands on first lookup, so --version loads none."""

    _plugins_loaded = False

    def _ensure_plugins(self):
        if not self._plugins_loaded:
            self._plugins_loaded = True
            from .pluginmanager import shared_manager

            shared_manager().hook.register_commands(cli=self)
            for command in self.commands.values():
                _with_global_options(command)

    def list_commands(self, ctx):
        self._ensure_plugins()
        return super().list_commands(ctx)

    def get_command(self, ctx, name):
        self._ensure_plugins()
        return super().get_command(ctx, name)


@click.group(name="dbdeck", cls=PluginGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="dbdeck", message="%(prog)s %(version)s")
def root():
    """dbdeck: prod-to-dev cloning, table sync, PostgreSQL replication and failover, Compose deploys.

    Every command takes --config FILE, --dry-run, -v and --format text|json, before or after its name.
    Exit codes: 0 ok, 1 failed, 2 usage or configuration error, 75 another run of the job is still going.
    """


@root.command("plugins")
@pass_app
def plugins_command(app):
    """List the loaded plugins with their versions and hooks."""
    from .pluginmanager import describe

    rows = describe(app.plugin_manager)
    app.emit(rows, lambda: output.table(rows, [("Plugin", "name"), ("Version", "version"), ("Source", "source"),
                                               ("Hooks", lambda r: ", ".join(r["hooks"]))]))


@root.group("config")
def config_group():
    """Check or show the effective configuration."""


@config_group.command("check")
@pass_app
def config_check(app):
    """Validate the config file; exit 2 with file:line: key: problem when it is wrong."""
    config = app.config
    app.emit({"file": config.where(), "ok": True, "endpoints": sorted(config.endpoints)},
             f"{config.where()}: OK ({len(config.endpoints)} endpoints, {len(config.sections())} sections)")


@config_group.command("show")
@pass_app
def config_show(app):
    """Print the effective configuration (defaults, overrides applied; secrets masked)."""
    from .config import dump

    data = dump(app.config)
    if app.format == "json":
        app.emit(data)
    else:
        import yaml

        click.echo(f"# {app.config.where()}")
        click.echo(secrets.mask(yaml.safe_dump(data, sort_keys=False)))


@root.command("endpoints")
@click.argument("names", nargs=-1)
@pass_app
def endpoints_command(app, names):
    """Show each configured endpoint (password masked), whether it answers, and its server version."""
    wanted = names or sorted(app.config.endpoints)
    rows = []
    for name in wanted:
        endpoint = app.endpoint(name)
        ok, detail = endpoint.ping()
        rows.append({"name": name, "kind": endpoint.kind, "role": endpoint.role, "target": endpoint.describe(),
                     "reachable": ok, "version" if ok else "error": detail})
    columns = [("Endpoint", "name"), ("State", lambda r: "up" if r["reachable"] else "DOWN"), ("Target", "target"),
               ("Version or error", lambda r: r.get("version") or r.get("error"))]
    app.emit(rows, lambda: output.table(rows, columns))
    if not all(r["reachable"] for r in rows):
        sys.exit(EXIT_FAILED)


@root.command("status")
@click.option("--format", "output_format", type=click.Choice(["text", "json", "prometheus"]), default=None,
              help="text (a table), json, or prometheus (the exposition format).")
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="Write to FILE (atomically; e.g. node_exporter's textfile directory) instead of stdout.")
@click.option("--serve", metavar="[HOST]:PORT", default=None,
              help="Serve the Prometheus metrics on http://HOST:PORT/metrics until stopped (SIGTERM, Ctrl-C); "
                   "without HOST on 127.0.0.1 only.")
@pass_app
def status_command(app, output_format, output, serve):
    """One view of everything dbdeck runs on this host.

    Scheduled jobs (timing, where installed, last run, result, duration, next run, running now), services
    (auto-failover, webhook-relay, local-sync watch: alive, pid, since), the replication verdict, and the
    last sync, deploy and backup. Exit 1 when any row is failing, stale, dead or down.
    """
    from . import status

    output_format = output_format or app.format
    gather = lambda: status.collect(app)  # noqa: E731
    if serve:
        import signal
        import threading

        from .httpserve import parse_address

        try:
            parse_address(serve)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--serve") from None
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        status.serve_prometheus(gather, serve, stop, ready=lambda host, port: app.announce(
            "dbdeck status metrics", serving=f"http://{host}:{port}/metrics"))
        return
    items = gather()
    if output_format == "prometheus":
        text = status.render_prometheus(lambda: items)
    else:
        if output_format == "json":
            text = json.dumps(secrets.mask_values([i.as_dict() for i in items]), indent=2, default=str) + "\n"
        else:
            text = secrets.mask(status.render_text(items)) + "\n"
    if output:
        from .state import write_atomic

        write_atomic(output, text, mode=0o644)
    elif output_format == "json":
        from .output import document

        document(text.rstrip("\n"))
    else:
        click.echo(text, nl=False)
    if any(i.problem for i in items):
        sys.exit(EXIT_FAILED)


@root.command("history")
@click.option("--since", default=None, help="Only events after this: 90m, 12h, 7d, or a date/time (2026-12-01).")
@click.option("--kind", "kinds", multiple=True,
              help="Only events whose kind starts with this (failover, switchover, deploy, rebuild...); repeatable.")
@pass_app
def history_command(app, since, kinds):
    """What dbdeck did on this host, oldest first: failovers, switchovers, promotions, rebuilds, deploys,
    rollbacks, restores, failed syncs (every event that went to the notify hook); under Patroni also its
    timeline history (every promotion Patroni made, kind patroni.timeline)."""
    from . import history

    try:
        since_ts = history.parse_since(since) if since else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    before = len(app.hook_failures)
    found = app.guarded_hook("history_entries", app=app)
    failures = app.hook_failures[before:]
    for failure in failures:
        log.error("%s: its events are missing below", failure.message)
    extra = [entry for _, entries in found for entry in entries or []]
    entries = history.read(app.config, since_ts, kinds, extra)
    app.emit(entries, lambda: "\n".join(f"{e['at']}  {e['severity']:<8} {e['kind']:<24} {e['message']}"
                                        for e in entries)
             or "no events recorded" + (" in that period" if since else ""))
    if failures:
        sys.exit(EXIT_FAILED)


def build_cli():
    """The root group with the global options everywhere; plugin commands load on first lookup."""
    if not any(p.name == "dry_run" for p in root.params if isinstance(p, click.Option)):
        _with_global_options(root)
    return root


def run_command(command, args=None, prog_name=None):
    """Invoke a click command, mapping dbdeck's exceptions to exit codes and masked one-line errors."""
    from . import log as log_module

    if os.environ.get("DBDECK_TIMESTAMP_LINES") and not isinstance(sys.stderr, output.TimestampedLines):
        # a daemon writing to its own log file (Runner.start_daemon): every line gets its time
        sys.stdout, sys.stderr = output.TimestampedLines(sys.stdout), output.TimestampedLines(sys.stderr)
    log_module.setup(0)
    _stop_cleanly_on_sigterm()
    given = [str(a) for a in (sys.argv[1:] if args is None else args)]
    gate = output.JsonStdout(sys.stdout) if _asks_for_json(given) else None
    if gate is not None:
        sys.stdout = gate
    try:
        code = _run_mapping_errors(command, args, prog_name)
    finally:
        if gate is not None:
            sys.stdout = gate._stream
    if gate is not None and not gate.written:
        # --format json promises one document on stdout, whatever happened: a command that wrote none
        # (a dry run, a set-up, a failure) gets one, with the messages it gave people
        if code not in (0, None):
            document = {"error": _last_error[0] if _last_error else f"exit status {code}", "exit_code": code}
        else:
            document = {"ok": True, "exit_code": 0, "dry_run": "--dry-run" in given or "-n" in given}
        document["messages"] = [secrets.mask(text) for text in gate.messages]
        output.document(json.dumps(document, indent=2))
    return code


_last_error: list[str] = []


def _asks_for_json(args):
    args = [str(a) for a in args or ()]
    return "--format=json" in args or any(a == "--format" and b == "json" for a, b in zip(args, args[1:]))


def _say_error(line):
    _last_error[:] = [line]
    _echo_if_possible(line)


def _run_mapping_errors(command, args, prog_name):
    try:
        try:
            command.main(args=args, prog_name=prog_name, standalone_mode=False)
        finally:
            _hold_sigterm()
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except SystemExit as exc:  # a command's own sys.exit(N): the same exit, through the same JSON path
        if isinstance(exc.code, str):
            _say_error(exc.code)
            return EXIT_FAILED
        return exc.code or 0
    except click.ClickException as exc:
        exc.show()
        _last_error[:] = [exc.format_message()]
        return EXIT_USAGE
    except click.exceptions.Abort as exc:
        # click turns Ctrl-C and SIGTERM (errors.Terminated) into Abort; the cause says which
        if isinstance(exc.__cause__, KeyboardInterrupt):  # Terminated included
            _end_interrupted(exc.__cause__)
        click.echo("Aborted.", err=True)
        return EXIT_FAILED
    except DbdeckError as exc:
        _say_error(f"{prog_name or 'dbdeck'}: error: {secrets.mask(str(exc))}")
        if logging.getLogger("dbdeck").isEnabledFor(logging.DEBUG):
            import traceback

            click.echo(secrets.mask(traceback.format_exc()), err=True)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # Terminated included
        _end_interrupted(exc)
    except BrokenPipeError:
        output.detach(sys.stdout)
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - a bug or an unforeseen fault: one masked line, not a traceback
        name = prog_name or "dbdeck"
        detail = str(exc).splitlines()[0] if str(exc) else ""
        _say_error(f"{name}: error: {type(exc).__name__}{': ' + secrets.mask(detail) if detail else ''}"
                   f" (unexpected; -vv shows where)")
        if logging.getLogger("dbdeck").isEnabledFor(logging.DEBUG):
            import traceback

            click.echo(secrets.mask(traceback.format_exc()), err=True)
        return EXIT_FAILED
    return 0


def _stop_cleanly_on_sigterm():
    """SIGTERM stops the programs we wait for, then unwinds like Ctrl-C (see errors.Terminated).
    Commands that serve (scheduler, auto-failover, relays) install their own handler after this."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        return

    def on_sigterm(signum, frame):
        from .run import stop_children

        stop_children(signal.SIGTERM)
        raise Terminated()

    signal.signal(signal.SIGTERM, on_sigterm)


def _hold_sigterm():
    """Once the command's work is over, a SIGTERM has nothing left to stop: it stays pending. Otherwise one
    arriving while Python shuts down (which puts back the default action) would end a finished run as
    killed (-15) instead of with its exit status."""
    from .run import hold_termination

    hold_termination()


def _end_interrupted(exc):
    """Ctrl-C (130) or SIGTERM (143, errors.Terminated, whose handler already stopped the children)."""
    if isinstance(exc, Terminated):
        _echo_if_possible("Terminated.")
        _exit_at_once(143)
    from .run import stop_children

    stop_children(signal.SIGINT)
    _echo_if_possible("Interrupted.")
    _exit_at_once(130)


def _exit_at_once(code):
    """End an interrupted run now. Its cleanup has run (the exception unwound every `finally`: staging
    dropped, locks released) and its programs were told to stop; a worker thread still waiting on one,
    or a library's timer thread, must not keep the process alive after that."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _echo_if_possible(line):
    try:
        click.echo(line, err=True)
    except (OSError, ValueError):
        pass


def main(argv=None):
    sys.exit(run_command(build_cli(), argv, prog_name="dbdeck"))


def main_for(command_name):
    """An entry point running one plugin command as its own executable (bin/<command>)."""

    def entry(argv=None):
        cli = build_cli()
        command = cli.get_command(None, command_name)
        if command is None:
            click.echo(f"dbdeck: no command {command_name!r} is registered (is its plugin installed?)", err=True)
            sys.exit(EXIT_USAGE)
        sys.exit(run_command(command, argv, prog_name=command_name))

    return entry
