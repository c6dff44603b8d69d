"""replication plugin: check-replication, setup-master, promote-replica, rebuild-replica (seed 004)."""

from dbdeck.hookspecs import hookimpl


@hookimpl
def register_commands(cli):
    from .commands import (auto_failover, check_replication, promote_replica, rebuild_replica, setup_master,
                           switchover)

    for command in (check_replication, setup_master, promote_replica, rebuild_replica, switchover, auto_failover):
        cli.add_command(command)


@hookimpl
def config_section():
    from dbdeck.config import ConfigSection

    from .model import Replication

    return ConfigSection("replication", Replication,
                         description="streaming replication pair: nodes, drivers, replication user, slot, lag limits")
