"""Which node dbdeck made the primary, written by every role change it makes (setup-master, promote-replica,
switchover, auto-failover, a restore over the primary).

When two nodes accept writes, this record decides which one gets the write endpoint (/primary) and
which one check-replication says to stop, never the higher timeline: a restored copy promotes onto a
newer timeline than the pair's primary without being the one the applications write to. With two
writable nodes and no record, neither gets writes.
"""

import logging

from dbdeck import output

log = logging.getLogger("dbdeck.replication")


def recorded_primary(pair):
    return pair.record("primary").read().get("primary")


def record_primary(pair, name, how):
    if pair.runner.dry_run:
        return
    pair.record("primary").write({"primary": name, "how": how, "at": output.timestamp()})
    log.debug("recorded %s as the primary (%s)", name, how)
