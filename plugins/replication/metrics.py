"""Prometheus metrics of a Snapshot, with the names the seed's alert rules use.

`pg_stat_replication_replay_lsn` exists only while a standby is connected, so the seed's
`absent(pg_stat_replication_replay_lsn)` alert fires exactly when no replica streams.
"""

from .cluster import lsn_to_int


class ReplicationCollector:
    """A prometheus-client collector; `snapshot_and_status` is called on every scrape."""

    def __init__(self, snapshot_and_status):
        self._snapshot_and_status = snapshot_and_status

    def collect(self):
        snapshot, status = self._snapshot_and_status()
        return families(snapshot, status)


def families(snapshot, status):
    from prometheus_client.core import GaugeMetricFamily

    def gauge(name, documentation, labels):
        return GaugeMetricFamily(name, documentation, labels=labels)

    up = gauge("pg_up", "Whether the node answered a query (1) or not (0).", ["node"])
    primary = gauge("pg_replication_is_primary", "1 when the node accepts writes (not in recovery).", ["node"])
    timeline = gauge("pg_replication_timeline", "The node's current timeline.", ["node"])
    lsn = {kind: gauge(f"pg_stat_replication_{kind}_lsn", f"The standby's {kind} position (bytes), as the "
                       f"primary's pg_stat_replication reports it.", ["standby", "slot"])
           for kind in ("sent", "write", "flush", "replay")}
    lag_bytes = gauge("pg_replication_lag_bytes", "WAL bytes the standby has not replayed yet.", ["standby"])
    lag_seconds = gauge("pg_replication_lag_seconds",
                        "Replay delay in seconds; 0 when the standby has replayed everything.", ["standby"])
    connected = gauge("pg_replication_connected_standbys", "Standbys streaming from the primary.", [])
    slot_active = gauge("pg_replication_slot_active", "1 when a standby uses the slot.", ["slot", "node"])
    slot_retained = gauge("pg_replication_slot_retained_wal_bytes",
                          "WAL the slot holds back on the primary (bytes).", ["slot", "node"])
    slot_safe = gauge("pg_replication_slot_safe_wal_size_bytes",
                      "WAL that can still be written before the slot loses data (max_slot_wal_keep_size).",
                      ["slot", "node"])
    check = gauge("pg_replication_check_status", "check-replication's verdict: 0 OK, 1 WARNING, 2 CRITICAL, "
                  "3 UNKNOWN.", [])

    for node in snapshot.nodes:
        up.add_metric([node.name], 1 if node.reachable else 0)
        if node.reachable:
            primary.add_metric([node.name], 0 if node.in_recovery else 1)
            if node.timeline is not None:
                timeline.add_metric([node.name], node.timeline)
            if not node.in_recovery:
                for slot in node.slots:
                    labels = [slot["slot_name"], node.name]
                    slot_active.add_metric(labels, 1 if slot["active"] else 0)
                    if slot["retained_bytes"] is not None:
                        slot_retained.add_metric(labels, slot["retained_bytes"])
                    if slot["safe_wal_size"] is not None:
                        slot_safe.add_metric(labels, slot["safe_wal_size"])
    streaming = 0
    for standby in snapshot.standbys:
        if standby.state is None:
            continue
        streaming += 1
        for kind, family in lsn.items():
            value = lsn_to_int(getattr(standby, f"{kind}_lsn"))
            if value is not None:
                family.add_metric([standby.name, standby.slot_name or ""], value)
        if standby.lag_bytes is not None:
            lag_bytes.add_metric([standby.name], standby.lag_bytes)
        if standby.lag_seconds is not None:
            lag_seconds.add_metric([standby.name], standby.lag_seconds)
    connected.add_metric([], streaming)
    check.add_metric([], status)
    result = [up, primary, timeline, *lsn.values(), lag_bytes, lag_seconds, connected, slot_active, slot_retained,
              slot_safe, check]
    # an empty family would still print its HELP line; absent() must see no series at all
    return [family for family in result if family.samples]


def exposition(snapshot, status):
    """Text exposition format, for node_exporter's textfile collector."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReplicationCollector(lambda: (snapshot, status)))
    return generate_latest(registry).decode()


def serve(address, port, snapshot_and_status, cache_seconds=1.0):
    """Serve /metrics; scrapes within cache_seconds share one probe of the nodes. Returns the server
    (stop() ends it)."""
    from prometheus_client import CollectorRegistry

    from dbdeck.httpserve import serve_metrics

    from .health import Shared

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReplicationCollector(Shared(snapshot_and_status, cache_seconds).get))
    return serve_metrics(registry, (address, port), name="replication metrics")
