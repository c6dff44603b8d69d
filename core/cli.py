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

from . import __version__, secrets
from .errors import EXIT_FAILED, EXIT_USAGE, DbdeckError, Terminated

log = logging.getLogger("dbdeck")


class App:
    """Per-invocation state shared by every command: options, config, runner, plugins."""

    def __init__(self):
        self.config_path = None
        self.dry_run = False
        self.verbosity = 0
        self.format = "text"
        self._config = None
        self._runner = None
        self._manager = None

    @property
    def plugin_manager(self):
        if self._manager is None:
            from .pluginmanager import shared_manager

            self._manager = shared_manager()
        return self._manager

    @property
    def config(self):
        if self._config is None:
            from . import config as config_module

            sections = []
            for result in self.plugin_manager.hook.config_section():
                sections.extend(result if isinstance(result, (list, tuple)) else [result])
            self._config = config_module.load(self.config_path, sections)
        return self._config

    @property
    def runner(self):
        if self._runner is None:
            from .run import Runner

            self._runner = Runner(dry_run=self.dry_run, echo=click.echo)
        return self._runner

    def endpoint(self, ref, key="endpoint"):
        """An Endpoint from a name under `endpoints:` or an inline mapping in a plugin's section."""
        from .config import EndpointConfig, validate_model
        from .endpoints import Endpoint

        if isinstance(ref, str):
            return Endpoint(ref, self.config.endpoint_config(ref), self.runner)
        if isinstance(ref, dict):
            ref = validate_model(EndpointConfig, ref, key.split("."))
        return Endpoint(key.rsplit(".", 1)[-1], ref, self.runner)

    def lock(self, job_name):
        """The job lock for job_name, under the configured run dir."""
        from .lock import JobLock

        return JobLock(job_name, self.config.core.run_dir)

    def notify(self, event):
        if self.dry_run:
            self.runner.say(f"would notify: {event.kind}: {event.message}")
            return
        log.log(logging.WARNING if event.severity != "info" else logging.INFO, "%s: %s", event.kind, event.message)
        try:
            config = self.config
        except DbdeckError:
            config = None
        if config is not None:
            from . import history

            try:
                history.append(config, event)
            except OSError as exc:  # a full disk must not turn a done failover into a failed command
                log.warning("could not add the event to the history journal: %s", exc)
        self.plugin_manager.hook.notify(event=event, config=config)

    def record_result(self, name, kind, ok, summary, seconds=None, **details):
        """Remember how this command's work ended, for `dbdeck status` (nothing in a dry run)."""
        if self.dry_run:
            return
        from .status import record_result

        try:
            record_result(self.config, name, kind, ok, summary, seconds, **details)
        except OSError as exc:
            log.warning("could not record the result for dbdeck status: %s", exc)

    def emit(self, data, text=None):
        """Print a result: JSON with --format json, otherwise text (a string or a callable)."""
        from . import output

        if self.format == "json":
            # masked value by value: masking the JSON text could swallow a closing quote
            output.line(json.dumps(secrets.mask_values(data), indent=2, default=str, sort_keys=False))
        else:
            output.line(secrets.mask(text() if callable(text) else (text if text is not None else str(data))))


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


@click.group(name="dbdeck", cls=PluginGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
    app.emit(rows, lambda: "\n".join(f"{r['name']:<20} {r['version']:<10} {r['source']:<12} {', '.join(r['hooks'])}"
                                      for r in rows))


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
    app.emit(rows, lambda: "\n".join(
        f"{'up  ' if r['reachable'] else 'DOWN'} {r['target']}  {r.get('version') or r.get('error')}" for r in rows))
    if not all(r["reachable"] for r in rows):
        sys.exit(EXIT_FAILED)


@root.command("status")
@click.option("--format", "output_format", type=click.Choice(["text", "json", "prometheus"]), default=None,
              help="text (a table), json, or prometheus (the exposition format).")
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="Write to FILE (atomically; e.g. node_exporter's textfile directory) instead of stdout.")
@click.option("--serve", metavar="HOST:PORT", default=None,
              help="Serve the Prometheus metrics on http://HOST:PORT/metrics until stopped (SIGTERM, Ctrl-C).")
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

        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        log.warning("serving dbdeck metrics on http://%s/metrics", serve)
        status.serve_prometheus(gather, serve, stop)
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
    rollbacks, restores, failed syncs (every event that went to the notify hook)."""
    from . import history

    try:
        since_ts = history.parse_since(since) if since else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    entries = history.read(app.config, since_ts, kinds)
    app.emit(entries, lambda: "\n".join(f"{e['at']}  {e['severity']:<8} {e['kind']:<24} {e['message']}"
                                        for e in entries) or "no events recorded" + (" in that period" if since else ""))


def build_cli():
    """The root group with the global options everywhere; plugin commands load on first lookup."""
    if not any(p.name == "dry_run" for p in root.params if isinstance(p, click.Option)):
        _with_global_options(root)
    return root


def run_command(command, args=None, prog_name=None):
    """Invoke a click command, mapping dbdeck's exceptions to exit codes and masked one-line errors."""
    from . import log as log_module

    log_module.setup(0)
    _stop_cleanly_on_sigterm()
    try:
        command.main(args=args, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return EXIT_USAGE
    except click.exceptions.Abort as exc:
        # click turns Ctrl-C and SIGTERM (errors.Terminated) into Abort; the cause says which
        if isinstance(exc.__cause__, Terminated):
            _echo_if_possible("Terminated.")
            return 143
        if isinstance(exc.__cause__, KeyboardInterrupt):
            from .run import stop_children

            stop_children(signal.SIGINT)
            _echo_if_possible("Interrupted.")
            return 130
        click.echo("Aborted.", err=True)
        return EXIT_FAILED
    except DbdeckError as exc:
        click.echo(f"{prog_name or 'dbdeck'}: error: {secrets.mask(str(exc))}", err=True)
        if logging.getLogger("dbdeck").isEnabledFor(logging.DEBUG):
            import traceback

            click.echo(secrets.mask(traceback.format_exc()), err=True)
        return exc.exit_code
    except Terminated:
        _echo_if_possible("Terminated.")
        return 143
    except KeyboardInterrupt:
        from .run import stop_children

        stop_children(signal.SIGINT)
        _echo_if_possible("Interrupted.")
        return 130
    except BrokenPipeError:
        from . import output

        output.detach(sys.stdout)
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - a bug or an unforeseen fault: one masked line, not a traceback
        name = prog_name or "dbdeck"
        detail = str(exc).splitlines()[0] if str(exc) else ""
        click.echo(f"{name}: error: {type(exc).__name__}{': ' + secrets.mask(detail) if detail else ''}"
                   f" (unexpected; -vv shows where)", err=True)
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
