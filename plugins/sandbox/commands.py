"""Click commands of the sandbox plugin (light: the servers module is imported on use)."""

import click

from dbdeck.cli import pass_app
from dbdeck.errors import EXIT_FAILED

DEFAULT_DIR = ".dbdeck-sandbox"
dir_option = click.option("--dir", "directory", default=DEFAULT_DIR, show_default=True, type=click.Path(),
                          help="Where the sandbox keeps its state, config, secrets and data.")


def _sandbox(app, directory):
    from .sandbox import Sandbox

    return Sandbox(directory, app.runner)


@click.group("sandbox")
def sandbox():
    """Throwaway local servers: PostgreSQL prod and dev, a replication pair, a MariaDB tenant.

    `up` writes DIR/dbdeck.yaml pointing at them; use it with --config to try any command safely.
    """


@sandbox.command("up")
@dir_option
@click.option("--only", multiple=True,
              type=click.Choice(["prod", "dev", "conecta-postgres", "conecta-postgres-replica", "tenant"]),
              help="Start only these servers (repeatable; default: all).")
@click.option("--no-sample-data", is_flag=True, help="Leave the databases empty.")
@click.option("--with-containers", is_flag=True,
              help="Also run the seeds' containers crm-postgres and crm-postgres-dev (needs Docker and the "
                   "dbdeck-base image: scripts/build-base-image), reached by `docker exec` as the seeds do.")
@pass_app
def up(app, directory, only, no_sample_data, with_containers):
    """Start the sandbox servers (idempotent: restarts stopped ones).

    Servers: PostgreSQL prod and dev (dev also holds crm_external, the other side of sync-databases),
    the replication pair conecta-postgres and conecta-postgres-replica, a MariaDB tenant; with
    --with-containers also the seeds' database containers. DIR/dbdeck.yaml points at all of them.
    """
    from .sandbox import COMPONENTS, CONTAINERS

    box = _sandbox(app, directory)
    if app.dry_run:
        wanted = tuple(only) or tuple(COMPONENTS)
        state = box.load_state()
        for name in wanted:
            if state and name in state["servers"]:
                app.runner.say(f"would start {name} if stopped (127.0.0.1:{state['servers'][name]['port']})")
            else:
                app.runner.say(f"would create and start {name}: {COMPONENTS[name][3]}, on a free 127.0.0.1 port")
        if with_containers:
            app.runner.say(f"would start containers {', '.join(c for c, _, _ in CONTAINERS.values())} "
                           f"(docker compose project dbdeck-sandbox)")
        app.runner.say(f"would write {box.config_path} and passwords under {box.secrets_dir}")
        return
    box.up(components=tuple(only) or tuple(COMPONENTS), sample_data=not no_sample_data,
           progress=lambda line: click.echo(f"sandbox: {line}", err=True), with_containers=with_containers)
    _show(app, box.status())


@sandbox.command("status")
@dir_option
@pass_app
def status(app, directory):
    """Show each sandbox server, its port and whether it runs (exit 1 if any is down)."""
    box = _sandbox(app, directory)
    result = box.status()
    if result is None:
        app.emit({"dir": str(box.dir), "servers": []}, f"no sandbox at {box.dir} (run `dbdeck sandbox up`)")
        raise SystemExit(EXIT_FAILED)
    _show(app, result)
    if not all(s["running"] for s in result["servers"]):
        raise SystemExit(EXIT_FAILED)


@sandbox.command("down")
@dir_option
@pass_app
def down(app, directory):
    """Stop every sandbox server and delete its data."""
    box = _sandbox(app, directory)
    if app.dry_run:
        state = box.load_state()
        for name in (state or {}).get("servers", {}):
            app.runner.say(f"would stop {name} and delete its data")
        app.runner.say(f"would remove {box.dir}" if box.dir.exists() else f"no sandbox at {box.dir}")
        return
    existed = box.down(progress=lambda line: click.echo(f"sandbox: {line}", err=True))
    app.emit({"dir": str(box.dir), "removed": existed},
             f"sandbox at {box.dir} removed" if existed else f"no sandbox at {box.dir}")


def _show(app, result):
    def text():
        lines = [f"sandbox {result['dir']}", f"config  {result['config']}"]
        for s in result["servers"]:
            state = "running" if s["running"] else "STOPPED"
            role = " (standby, read-only)" if s.get("in_recovery") else ""
            where = f"127.0.0.1:{s['port']}" if s["port"] else s["host"]
            lines.append(f"  {s['name']:<25} {s['kind']:<10} {where:<18} {s['database']:<16} {state}{role}")
        return "\n".join(lines)

    app.emit(result, text)
