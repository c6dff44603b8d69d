"""Which node dbdeck made the primary, written by every role change it makes (setup-master, promote-replica,
switchover, auto-failover, a restore over the primary).

When two nodes accept writes, this record decides which one gets the write endpoint (/primary) and
which one check-replication says to stop, never the higher timeline: a restored copy promotes onto a
newer timeline than the pair's primary without being the one the applications write to. With two
writable nodes and no record, neither gets writes.
"""

import json
import logging

from dbdeck import output
from dbdeck.state import write_atomic

log = logging.getLogger("dbdeck.replication")


def _record_file(pair):
    return pair.app.config.state_dir / "replication" / "primary.json"


def recorded_primary(pair):
    try:
        return json.loads(_record_file(pair).read_text()).get("primary")
    except (OSError, ValueError, AttributeError):
        return None


def record_primary(pair, name, how):
    if pair.runner.dry_run:
        return
    path = _record_file(pair)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"primary": name, "how": how, "at": output.timestamp()}) + "\n")
    log.debug("recorded %s as the primary (%s)", name, how)
