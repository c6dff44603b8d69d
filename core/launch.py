"""Entry points of the per-command executables.

`python -m dbdeck.launch COMMAND [ARGS...]` is what bin/<command> runs from a checkout; the names
below are the console_scripts of an installed dbdeck (setup.cfg). Both build on cli.main_for().
"""

import sys


def _command(name):
    """A console_scripts entry that imports the command line tool only when it runs."""

    def entry(argv=None):
        from dbdeck.cli import main_for

        return main_for(name)(argv)

    return entry


auto_failover = _command("auto-failover")
backup = _command("backup")
check_replication = _command("check-replication")
deploy = _command("deploy")
local_sync = _command("local-sync")
promote_replica = _command("promote-replica")
rebuild_replica = _command("rebuild-replica")
rotate_replication_password = _command("rotate-replication-password")
setup_master = _command("setup-master")
setup_sync_cron = _command("setup-sync-cron")
switchover = _command("switchover")
sync_databases = _command("sync-databases")
sync_prod_to_dev = _command("sync-prod-to-dev")
webhook_relay = _command("webhook-relay")

if __name__ == "__main__":
    from dbdeck import quick

    answered = quick.answer(sys.argv[1:])  # a scheduled run with nothing to do, from its stamp
    if answered is not None:
        sys.exit(answered)
    from dbdeck.cli import main, main_for

    if len(sys.argv) < 2 or sys.argv[1] == "dbdeck":
        main(sys.argv[2:])
    else:
        main_for(sys.argv[1])(sys.argv[2:])
