"""A planned role change hands HAProxy's write port over before it returns.

HAProxy learns roles from its checks of each node's /primary: with `fall 2` it keeps sending new
connections to a node for up to two check intervals after that node stopped being the primary, and
with `rise 1` it uses a new primary one interval after it became one. A switchover that returned in
between would leave clients connecting to a node that is shutting down, or to no node at all. So the
switchover waits, at each end, until HAProxy itself has seen the change: from its stats page when
`replication.haproxy.stats_port` is set, or else from the same health endpoint HAProxy checks, plus the
time its checks need to notice.
"""

import csv
import io
import logging
import time
import urllib.error
import urllib.request

from dbdeck.errors import DbdeckError

from .haproxy import WRITE, bracketed, health_check_host, local_address

log = logging.getLogger("dbdeck.replication")


def write_port_servers(settings, timeout=2.0):
    """{server name: status ('UP', 'DOWN', 'UP 1/2'...)} of the write port's section, read from HAProxy's
    stats page (CSV); None when it has no stats port or does not answer."""
    if not settings.stats_port:
        return None
    url = f"http://{bracketed(local_address(settings.bind))}:{settings.stats_port}/;csv"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode("utf-8", "replace")
    except (OSError, urllib.error.URLError):
        return None
    rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
    return {row["svname"]: row.get("status", "") for row in rows
            if row.get("pxname") == WRITE and row.get("svname") not in ("FRONTEND", "BACKEND")}


def _health_status(pair, node):
    """What HAProxy's check of this node's /primary gets now (an HTTP status), or None with no answer."""
    if not node.config.health_port:
        return None
    url = f"http://{bracketed(health_check_host(pair, node))}:{node.config.health_port}/primary"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, urllib.error.URLError):
        return None


def _wait(pair, condition, what, timeout):
    """Whether condition came true within timeout (pair.wait_for, without the error)."""
    try:
        return bool(pair.wait_for(condition, what, timeout=timeout))
    except DbdeckError:
        return False


def _settings(pair):
    """HAProxy's settings when it is in front of the pair (its stats port is set, or every node has the
    health_port its checks need), else None: nothing to hand over."""
    if pair.settings.manager != "native":
        return None  # Patroni's own switchover hands its REST API's answers over
    settings = pair.settings.haproxy
    if settings.stats_port or all(node.config.health_port for node in pair.nodes):
        return settings
    return None


def wait_unrouted(pair, node, timeout=15):
    """Before node stops being the primary: HAProxy sends it no new connection (and, with
    `on-marked-down shutdown-sessions`, has closed the ones it had)."""
    settings = _settings(pair)
    if settings is None:
        return
    servers = write_port_servers(settings)
    if servers is not None and node.name in servers:
        if _wait(pair, lambda: not (write_port_servers(settings) or {}).get(node.name, "").startswith("UP"),
                 f"HAProxy to mark {node.name} down", timeout):
            pair.say(f"HAProxy marked {node.name} down on its write port")
            return
        pair.say(f"HAProxy still routes writes to {node.name} after {timeout}s (stats: "
                 f"{write_port_servers(settings)}); going on", logging.WARNING)
        return
    if _health_status(pair, node) is None:
        return  # nothing answers HAProxy's checks of it: HAProxy does not route to it either
    if not _wait(pair, lambda: _health_status(pair, node) != 200, f"{node.name}'s /primary to turn", timeout):
        pair.say(f"{node.name}'s /primary still answers 200 after {timeout}s; going on", logging.WARNING)
        return
    # two failed checks (fall 2): the first within an interval, the next one fast interval later
    time.sleep((settings.check_interval_ms + max(100, settings.check_interval_ms // 2) + 200) / 1000)
    pair.say(f"{node.name}'s /primary answers 503; waited for HAProxy's checks to see it "
             f"(set replication.haproxy.stats_port to watch HAProxy itself)")


def wait_routed(pair, node, timeout=30):
    """After node became the primary: HAProxy's write port sends new connections to it."""
    settings = _settings(pair)
    if settings is None:
        return True
    servers = write_port_servers(settings)
    if servers is not None and node.name in servers:
        def routed():
            states = write_port_servers(settings) or {}
            return states.get(node.name, "").startswith("UP") and not any(
                state.startswith("UP") for name, state in states.items() if name != node.name)

        if _wait(pair, routed, f"HAProxy to route writes to {node.name}", timeout):
            pair.say(f"HAProxy routes writes to {node.name}")
            return True
        pair.say(f"HAProxy does not route writes to {node.name} after {timeout}s (stats: "
                 f"{write_port_servers(settings)}): check HAProxy and its health checks", logging.WARNING)
        return False
    unanswered_since = [time.monotonic()]

    def answers_200():
        status = _health_status(pair, node)
        if status is not None:
            unanswered_since[0] = time.monotonic()
        elif time.monotonic() - unanswered_since[0] > 5:
            raise TimeoutError  # nothing answers HAProxy's checks: waiting longer changes nothing
        return status == 200

    try:
        answered = _wait(pair, answers_200, f"{node.name}'s /primary to answer 200", timeout)
    except TimeoutError:
        answered = False
    if not answered:
        pair.say(f"{node.name}'s /primary does not answer 200 (is auto-failover or check-replication --serve "
                 f"answering health checks?): HAProxy cannot route writes to it yet", logging.WARNING)
        return False
    # rise 1: HAProxy's next check, at most one interval away, finds it
    time.sleep((settings.check_interval_ms + 200) / 1000)
    pair.say(f"{node.name}'s /primary answers 200; waited for HAProxy's next check "
             f"(set replication.haproxy.stats_port to watch HAProxy itself)")
    return True
