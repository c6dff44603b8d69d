"""`dbdeck haproxy render`: the configuration of the stable write endpoint."""

import click

from dbdeck.cli import pass_app


def write_file(app, text, output, what, mode=0o644):
    """Write text to output atomically (a dry run says so instead)."""
    if app.dry_run:
        app.runner.say(f"would write {what} to {output} ({len(text.splitlines())} lines)")
        return
    from pathlib import Path

    from dbdeck.state import write_atomic

    Path(output).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(output, text, mode=mode)
    click.echo(f"wrote {what} to {output}", err=True)


@click.group("haproxy")
def haproxy():
    """HAProxy in front of the nodes: one write port that follows the primary, one read port."""


@haproxy.command("render")
@click.option("--output", "-o", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the configuration to FILE (atomically, once `haproxy -c` accepts it); default: print it.")
@click.option("--snippet", is_flag=True, help="Only the listen sections, to add to an existing haproxy.cfg.")
@click.option("--no-check", is_flag=True, help="Do not run `haproxy -c` (for rendering on a host without HAProxy).")
@pass_app
def haproxy_render(app, output, snippet, no_check):
    """Render haproxy.cfg from replication: nodes, health_port and replication.haproxy.

    The write port (replication.haproxy.write_port, default 5000) goes to the node whose /primary
    answers 200: dbdeck's health checks (auto-failover, on each node's health_port) for a native pair,
    Patroni's REST API with manager: patroni. Point the applications' DATABASE_URL at it once; after a
    failover nothing changes on their side. The file is checked with `haproxy -c` before it is written.
    Then: `systemctl reload haproxy`.
    """
    from dbdeck.errors import DbdeckError

    from .commands import _pair
    from .haproxy import render, validate

    pair = _pair(app)
    text = render(pair, snippet=snippet, source=app.config.path)
    if not (no_check or snippet):
        try:
            problem = validate(app.runner, text)
        except FileNotFoundError:
            raise DbdeckError("haproxy is not installed here, so the configuration cannot be checked: install it "
                              "(apt-get install haproxy) or pass --no-check") from None
        if problem:
            raise DbdeckError(f"haproxy -c rejects the rendered configuration: {problem}")
    checked = not (no_check or snippet)
    if output:
        write_file(app, text, output, "haproxy.cfg")
    if app.format == "json":
        app.emit({"files": {} if output else {"haproxy.cfg": text},
                  "written": [output] if output and not app.dry_run else [], "checked": checked})
    elif not output:
        click.echo(text, nl=False)


@click.group("patroni")
def patroni():
    """Patroni + etcd clusters (replication.manager: patroni)."""


@patroni.command("render")
@click.option("--output", "-o", type=click.Path(file_okay=False), metavar="DIR",
              help="Write the files here (default: replication.patroni.config_dir, /etc/patroni).")
@click.option("--no-check", is_flag=True, help="Do not run `patroni --validate-config` and `haproxy -c`.")
@pass_app
def patroni_render(app, output, no_check):
    """Render Patroni's node configurations from dbdeck's YAML: the same file drives a native pair and a
    Patroni cluster.

    Writes <node>.yml for each node (etcd3, use_pg_rewind, replication slots, pg_hba from
    replication_networks, the superuser, replication and rewind roles without their passwords), env.conf
    with those passwords and the REST API's (mode 0600, for patroni@.service's EnvironmentFile; missing
    rewind and REST passwords are generated into 0600 files under the state directory) and haproxy.cfg
    checking Patroni's REST API. Each node file passes `patroni --validate-config` and haproxy.cfg
    `haproxy -c` before anything is written. On node N: copy N.yml and env.conf to /etc/patroni, then
    `systemctl start patroni@N`.
    """
    write_patroni_files(app, _patroni_pair(app), output, no_check)


def _patroni_pair(app):
    from dbdeck.errors import UsageError

    from .commands import _pair

    pair = _pair(app)
    if pair.settings.manager != "patroni":
        raise UsageError("replication.manager is native: set manager: patroni and a patroni: section first "
                         "(see README, 'From a native pair to Patroni')")
    return pair


def write_patroni_files(app, pair, output, no_check):
    """Render, check with Patroni's and HAProxy's own checkers, then write (nothing written on a failure)."""
    from pathlib import Path

    from dbdeck.errors import DbdeckError

    from .haproxy import validate as validate_haproxy
    from .patroni import render, validate

    from .setup import store_secret

    files, new_secrets = render(pair, source=app.config.path)
    if not no_check:
        try:
            problems = validate(app.runner, files)
            haproxy_problem = validate_haproxy(app.runner, files["haproxy.cfg"])
        except FileNotFoundError as exc:
            raise DbdeckError(f"{exc} is not installed here, so the files cannot be checked: install it or pass "
                              f"--no-check") from None
        if haproxy_problem:
            problems.append(f"haproxy.cfg: {haproxy_problem}")
        if problems:
            raise DbdeckError("the rendered files do not pass their checkers: " + " | ".join(problems))
    for path, value, what in new_secrets:  # only now: a render that fails its checks leaves nothing behind
        store_secret(pair, path, value, what)
    directory = Path(output or pair.settings.patroni.config_dir)
    for name, text in files.items():
        write_file(app, text, directory / name, name, mode=0o600 if name == "env.conf" else 0o644)
    if app.format == "json":
        app.emit({"written": [] if app.dry_run else [str(directory / name) for name in files],
                  "checked": not no_check})


@patroni.command("migrate")
@click.option("--output", "-o", type=click.Path(file_okay=False), metavar="DIR",
              help="Where the Patroni files go (default: replication.patroni.config_dir).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask on a terminal (runs without one never ask).")
@pass_app
def patroni_migrate(app, output, yes):
    """Hand the running native pair over to Patroni, keeping its data (the same nodes, the same YAML with
    manager: patroni). --dry-run shows every step and changes nothing.

    Checks the pair (one primary, every standby streaming, auto-failover stopped, etcd answering), writes
    the Patroni files as `patroni render` does, creates the rewind role on the primary, resets the settings
    Patroni manages (ALTER SYSTEM RESET synchronous_standby_names, primary_conninfo, ...), then stops the
    primary cleanly and the standbys. Writes are refused from then until Patroni runs:
    start patroni@<primary> first, then the others (README, 'From a native pair to Patroni').
    """
    from .commands import _confirm

    pair = _patroni_pair(app)
    _confirm(app, yes, "Stop the pair and hand it over to Patroni (writes stop until Patroni starts it)?")
    with pair.operator_lock():
        with pair.run_log("patroni-migrate"):
            from .patroni import migrate, ready_to_migrate

            snapshot = ready_to_migrate(pair)
            write_patroni_files(app, pair, output, no_check=False)
            primary = migrate(pair, snapshot)
    directory = output or pair.settings.patroni.config_dir
    steps = [f"start Patroni on {primary} first: systemctl start patroni@{primary}",
             *(f"then on {n.name}: systemctl start patroni@{n.name}" for n in pair.nodes if n.name != primary),
             "check: check-replication (manager patroni); reload HAProxy with haproxy.cfg from " + str(directory)]
    if app.format == "json":
        app.emit({"primary": primary, "files": str(directory), "next": steps, "dry_run": app.dry_run})
    else:
        click.echo("next:\n" + "\n".join(f"  {step}" for step in steps))
