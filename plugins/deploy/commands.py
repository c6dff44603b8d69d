"""`deploy`, `deploy rollback|status|lock`, `backup list|create|restore` (seed 002)."""

import sys

import click

from dbdeck.cli import pass_app
from dbdeck.errors import UsageError

ENV_HELP = "Environment (profile) to act on: production, staging or one defined under deploy.environments."


def _env_option(required=False):
    return click.option("--env", "environment", metavar="ENV", required=required, help=ENV_HELP)


def _environment(ctx, given):
    environment = given or ctx.meta.get("dbdeck.deploy.env")
    if not environment:
        raise UsageError("which environment? give --env production or --env staging")
    return environment


@click.group("deploy", invoke_without_command=True)
@_env_option()
@click.option("--version", "version", metavar="V",
              help="Version to deploy (an image tag). Default: $GITHUB_SHA[:12], else the source's git commit, "
                   "else a timestamp.")
@click.option("--any-branch", is_flag=True, help="Deploy even when the source is not on the profile's branch.")
@click.pass_context
@pass_app
def deploy(app, ctx, environment, version, any_branch):
    """Deploy the app to ENV: lock, backup, keep the running image, rsync, build, migrate, health check,
    and roll back automatically when the migrations or the health check fail.

    \b
    Steps (production profile; staging skips the backup and the rollback, and rsyncs with --delete):
      1. take the deploy lock on the server (a second deploy fails at once, naming the holder)
      2. pg_dump the app database through its container to backups/pre-deploy-YYYYMMDD-HHMMSS.sql
         (0600, last 5 kept); a failed backup stops a production deploy before anything changes
      3. tag the running image with its version (the last 3 versions are kept for rollback)
      4. rsync the source (profile excludes; .env is never sent)
      5. docker compose -f FILE build SERVICE
      6. replace the container (stop, rm, up -d --no-deps), run the migrations
      7. health check: N attempts, interval apart, expecting 200
      8. on failure: print the container's last log lines, roll back to the previous version and check
         it is healthy, exit 1; on success: prune old versions, append to the server's audit log.

    The server is reached over SSH (deploy.server: host/VPS_HOST, user/VPS_USER, key_file,
    known_hosts) or is this machine (deploy.server.target: local). --dry-run prints every command,
    local and remote, and runs none of them. Executables pre-deploy, post-deploy and post-rollback in
    the profile's hooks_dir run with DBDECK_DEPLOY_ENV/VERSION/PREVIOUS_VERSION/OUTCOME set.
    Exit codes: 0 deployed, 1 failed (rolled back or not, the message says), 2 usage/config, 75 locked.
    """
    ctx.meta["dbdeck.deploy.env"] = environment
    if ctx.invoked_subcommand is not None:
        if version or any_branch:
            raise UsageError("--version and --any-branch belong to the deploy itself, not to a subcommand")
        return
    from .deploy import Deployment, resolve

    context = resolve(app, _environment(ctx, environment))
    Deployment(context, version=version, check_branch=not any_branch).run()


@deploy.command("rollback")
@click.argument("version", required=False)
@_env_option()
@click.pass_context
@pass_app
def rollback(app, ctx, version, environment):
    """Roll ENV back to VERSION (default: the version deployed before the current one).

    The image of each of the last N deployed versions is kept on the server (`deploy status` lists
    them). The database is not rolled back: restore a pre-deploy backup for that (`backup restore`).
    """
    from .operations import rollback_command

    rollback_command(app, _environment(ctx, environment), version)


@deploy.command("status")
@_env_option()
@click.pass_context
@pass_app
def status(app, ctx, environment):
    """Current version, previous versions kept for rollback, container state, lock holder, recent deploys."""
    from .operations import status_command

    status_command(app, _environment(ctx, environment))


@deploy.group("lock")
def lock():
    """The server's deploy lock: acquire it for maintenance, release a stale one, or show its holder."""


@lock.command("acquire")
@_env_option()
@click.option("--message", "-m", "--reason", "reason", default=None, metavar="TEXT",
              help="Why the lock is held; deploys that fail on it show this (e.g. 'migrating the db, ask ana').")
@click.pass_context
@pass_app
def lock_acquire(app, ctx, environment, reason):
    """Take the deploy lock (deploys then fail at once naming you) until `deploy lock release`."""
    from .operations import lock_command

    lock_command(app, _environment(ctx, environment), "acquire", reason)


@lock.command("release")
@_env_option()
@click.pass_context
@pass_app
def lock_release(app, ctx, environment):
    """Remove the deploy lock whoever holds it (for a deploy that died), printing who held it."""
    from .operations import lock_command

    lock_command(app, _environment(ctx, environment), "release")


@lock.command("status")
@_env_option()
@click.pass_context
@pass_app
def lock_status(app, ctx, environment):
    """Show who holds the deploy lock, since when, deploying what; exit 1 when it is held."""
    from .operations import lock_command

    lock_command(app, _environment(ctx, environment), "status")


@click.group("backup")
def backup():
    """The app database's pre-deploy backups on the server: list, create, restore."""


@backup.command("list")
@_env_option()
@click.pass_context
@pass_app
def backup_list(app, ctx, environment):
    """List the backups on ENV's server, newest first."""
    from .operations import backup_list_command

    backup_list_command(app, _environment(ctx, environment))


@backup.command("create")
@_env_option()
@click.pass_context
@pass_app
def backup_create(app, ctx, environment):
    """Take a backup now (backups/manual-YYYYMMDD-HHMMSS.sql, the last N kept as for pre-deploy ones)."""
    from .operations import backup_create_command

    backup_create_command(app, _environment(ctx, environment))


@backup.command("restore")
@click.argument("file")
@_env_option()
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (needed when not on a terminal).")
@click.option("--no-safety-backup", is_flag=True,
              help="Skip the backup of the current database taken before restoring (pre-restore-*.sql).")
@click.pass_context
@pass_app
def backup_restore(app, ctx, file, environment, yes, no_safety_backup):
    """Replace the app database with backup FILE (a name from `backup list`), in one transaction.

    The current database is first backed up to backups/pre-restore-YYYYMMDD-HHMMSS.sql, and the deploy
    lock is held meanwhile, so no deploy runs during the restore.
    """
    from .operations import backup_restore_command

    environment = _environment(ctx, environment)
    if not yes and not app.dry_run:
        if not sys.stdin.isatty():
            raise UsageError("restoring replaces the database: pass --yes to confirm (no terminal to ask on)")
        click.confirm(f"Replace the {environment} database with {file}?", abort=True)
    backup_restore_command(app, environment, file, safety_backup=not no_safety_backup)

