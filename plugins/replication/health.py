"""Patroni-compatible health endpoints for the native pair, so HAProxy routes to whichever node is primary.

One HTTP port per node (nodes.<name>.health_port), answered by auto-failover and check-replication
--serve, with Patroni's paths and status codes: HAProxy's `option httpchk` configuration is then the
same for a native pair and a Patroni cluster.

/primary is 200 only for the node that accepts writes *now*, measured by a new connection and a query
(not in recovery, not read-only), never from a belief such as "holds the leader lock": Patroni keeps
answering 200 on /primary while its postmaster restarts, and HAProxy then sends clients to a dead port.
The query assigns no transaction id, so a check neither writes WAL nor waits for a synchronous standby.
Two writable nodes (a split brain) get 200 only for the one dbdeck last made the primary (roles.py), or for
neither: never by timeline, since a restored copy promotes onto a newer one.
"""

import json
import logging
import threading
import time
from urllib.parse import parse_qs, urlsplit

from dbdeck.httpserve import GuardedHTTPServer, QuietHandler

from .cluster import lsn_to_int
from .model import parse_size

log = logging.getLogger("dbdeck.replication")

WRITABLE = {"/primary", "/master", "/leader", "/read-write", "/"}
REPLICA = {"/replica"}
READABLE = {"/read-only"}
SYNC = {"/sync", "/synchronous"}
ASYNC = {"/async", "/asynchronous"}
ALWAYS = {"/liveness", "/patroni"}
PATHS = WRITABLE | REPLICA | READABLE | SYNC | ASYNC | ALWAYS | {"/health", "/readiness"}


def leader(snapshot):
    """The node writes should go to: the only writable one; of several, the one dbdeck's last role change
    made the primary (never the newest timeline: a restored copy is on one); with no record, none."""
    writable = [n for n in snapshot.primaries if not n.read_only]
    if len(writable) == 1:
        return writable[0].name
    recorded = snapshot.recorded_primary
    return recorded if recorded in {n.name for n in writable} else None


def _lag(snapshot, name):
    """Bytes the replica has not replayed: against the primary's position, or, with no primary to ask,
    what it received but has not replayed yet."""
    entry = next((s for s in snapshot.standbys if s.name == name), None)
    if entry is not None and entry.lag_bytes is not None:
        return entry.lag_bytes
    node = snapshot.node(name)
    received, replayed = lsn_to_int(node.receive_lsn), lsn_to_int(node.replay_lsn)
    return max(0, received - replayed) if received is not None and replayed is not None else None


def answer(path, query, snapshot, name):
    """(HTTP status, JSON body) for one node; pure, so every rule is unit-tested without servers."""
    node = snapshot.node(name)
    chosen = leader(snapshot)
    role = None if not node.reachable else "replica" if node.in_recovery else "primary"
    body = {"state": "running" if node.reachable else "unreachable", "role": role, "name": name,
            "server_version": node.version, "timeline": node.timeline}
    if not node.reachable:
        # whoever asks is not authenticated: the driver's message names the user, host, port and database
        body["error"] = "PostgreSQL does not answer (the reason is in dbdeck's log)"
    entry = next((s for s in snapshot.standbys if s.name == name), None)
    if role == "primary":
        body["xlog"] = {"location": lsn_to_int(node.current_lsn)}
    elif role == "replica":
        receiver = node.wal_receiver or {}
        body["xlog"] = {"received_location": lsn_to_int(node.receive_lsn),
                        "replayed_location": lsn_to_int(node.replay_lsn), "paused": bool(node.replay_paused)}
        body["replication_state"] = receiver.get("status")
        body["sync_state"] = entry.sync_state if entry else None
        body["lag"] = _lag(snapshot, name)
    if path not in PATHS:
        return 404, dict(body, reason=f"unknown path {path}; try /primary, /replica, /read-only or /health")

    def result(ok, reason):
        return (200 if ok else 503), dict(body, reason=reason)

    if path in ALWAYS:
        return result(True, "dbdeck answers")
    if path == "/health":
        return result(node.reachable, "PostgreSQL answers" if node.reachable else "PostgreSQL does not answer")
    if path in WRITABLE:
        if chosen == name:
            return result(True, "accepts writes")
        if role == "primary":
            return result(False, "accepts writes, but so does another node and dbdeck has no record of which is "
                          "the primary: not routing writes to either" if chosen is None else
                          f"{chosen} is the primary dbdeck's last role change made")
        return result(False, f"not writable ({role or 'down'})")
    if path == "/readiness":
        streaming = role == "replica" and (node.wal_receiver or {}).get("status") == "streaming"
        return result(chosen == name or streaming, "primary" if chosen == name else
                      "replica streaming" if streaming else "neither the primary nor a streaming replica")
    if path in READABLE and chosen == name:
        return result(True, "primary")
    if role != "replica":
        return result(False, f"not a replica ({role or 'down'})")
    if path in SYNC | ASYNC:
        sync = body["sync_state"] in ("sync", "quorum")
        return result(sync if path in SYNC else body["sync_state"] == "async", f"sync_state {body['sync_state']}")
    limit = query.get("lag")
    if limit is not None:
        try:
            limit = parse_size(limit)
        except ValueError as exc:
            return 400, dict(body, reason=f"lag: {exc}")
        lag = body["lag"]
        if lag is None or lag > limit:
            return result(False, f"lag {'unknown' if lag is None else lag} over {limit} bytes")
    return result(True, "replica")


class Shared:
    """produce()'s result, shared by every caller within `seconds` (HAProxy checks each node from each
    frontend; many scrapers may scrape at once); concurrent callers wait for the call in flight."""

    def __init__(self, produce, seconds):
        self.produce, self.seconds = produce, seconds
        self._lock = threading.Lock()
        self._value, self._taken = None, None

    def get(self):
        with self._lock:
            if self._taken is None or time.monotonic() - self._taken > self.seconds:
                self._value = self.produce()
                self._taken = time.monotonic()
            return self._value


class SnapshotSource(Shared):
    """One probe of the pair serves every health check arriving within cache_seconds."""

    def __init__(self, pair, timeout, cache_seconds):
        super().__init__(lambda: pair.probe(timeout), cache_seconds)


def _handler(name, source):
    class Handler(QuietHandler):
        server_version = "dbdeck"

        def _respond(self, with_body):
            url = urlsplit(self.path)
            # a blank value (lag=) is a bad value, not a missing one
            query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            try:
                code, body = answer(url.path.rstrip("/") or "/", query, source.get(), name)
            except Exception as exc:  # a probe that failed is an unhealthy node, never a hung check
                log.warning("health %s: probe failed: %s", name, exc)
                code, body = 503, {"state": "unknown", "name": name, "reason": "probe failed (see dbdeck's log)"}
            payload = (json.dumps(body, default=str) + "\n").encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if with_body:
                self.wfile.write(payload)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            self._respond(True)

        def do_HEAD(self):  # noqa: N802
            self._respond(False)

        def do_OPTIONS(self):  # noqa: N802  (Patroni's HAProxy template checks with OPTIONS)
            self._respond(False)

    return Handler


class HealthServers:
    """One listener per node with a health_port; stop() closes them all."""

    def __init__(self, pair, timeout):
        settings = pair.settings.health
        self.source = SnapshotSource(pair, timeout, settings.cache_seconds)
        self.servers = []
        try:
            for node in pair.nodes:
                if node.config.health_port:
                    server = GuardedHTTPServer((settings.listen, node.config.health_port),
                                               _handler(node.name, self.source), name=f"health {node.name}")
                    server.serve_in_thread()
                    self.servers.append((node.name, server))
        except OSError as exc:
            self.stop()
            from dbdeck.errors import DbdeckError

            raise DbdeckError(f"cannot answer health checks on {settings.listen}:{node.config.health_port} "
                              f"({node.name}): {exc.strerror}") from None

    def describe(self):
        return ", ".join(f"{name} http://{server.server_address[0]}:{server.server_address[1]}/primary"
                         for name, server in self.servers)

    def stop(self):
        for _, server in self.servers:
            server.stop()
        self.servers = []
