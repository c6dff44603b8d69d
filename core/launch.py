"""Entry points of the per-command executables.

`python -m dbdeck.launch COMMAND [ARGS...]` is what bin/<command> runs from a checkout; the names
below are the console_scripts of an installed dbdeck (setup.cfg). Both build on cli.main_for().
"""

import sys

from dbdeck.cli import main, main_for

auto_failover = main_for("auto-failover")
backup = main_for("backup")
check_replication = main_for("check-replication")
deploy = main_for("deploy")
local_sync = main_for("local-sync")
promote_replica = main_for("promote-replica")
rebuild_replica = main_for("rebuild-replica")
setup_master = main_for("setup-master")
setup_sync_cron = main_for("setup-sync-cron")
switchover = main_for("switchover")
sync_databases = main_for("sync-databases")
sync_prod_to_dev = main_for("sync-prod-to-dev")
webhook_relay = main_for("webhook-relay")

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] == "dbdeck":
        main(sys.argv[2:])
    else:
        main_for(sys.argv[1])(sys.argv[2:])
