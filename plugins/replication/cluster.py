"""What the pair looks like right now (probe), and what that means (evaluate).

probe() asks every node one query (plus its replication views), tolerating nodes that are down;
evaluate() turns the snapshot into a Nagios verdict. evaluate() is pure, so every verdict rule is
unit-tested without servers.
"""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from dbdeck import secrets
from dbdeck.errors import DbdeckError

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATUS_NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}

_NODE_QUERY = """
SELECT pg_is_in_recovery() AS in_recovery,
       current_setting('server_version') AS version,
       (SELECT system_identifier::text FROM pg_control_system()) AS system_identifier,
       CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END AS current_lsn,
       CASE WHEN pg_is_in_recovery()
            -- the timeline it receives now; its last restartpoint's lags behind after a switchover
            THEN COALESCE((SELECT received_tli FROM pg_stat_wal_receiver WHERE received_tli > 0),
                          (SELECT timeline_id FROM pg_control_checkpoint()))
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END AS timeline,
       pg_last_wal_receive_lsn()::text AS receive_lsn,
       pg_last_wal_replay_lsn()::text AS replay_lsn,
       extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 AS replay_age_seconds,
       CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() END AS replay_paused,
       current_setting('transaction_read_only') = 'on' AS read_only,
       current_setting('synchronous_standby_names') AS synchronous_standby_names
"""
_RECEIVER_QUERY = """
SELECT status, received_tli, sender_host, sender_port, slot_name, flushed_lsn::text AS flushed_lsn,
       extract(epoch FROM now() - last_msg_receipt_time)::float8 AS last_message_age_seconds
FROM pg_stat_wal_receiver
"""
_SENDERS_QUERY = """
SELECT r.pid, r.application_name, r.client_addr::text AS client_addr, r.state, r.sync_state,
       r.sent_lsn::text AS sent_lsn, r.write_lsn::text AS write_lsn, r.flush_lsn::text AS flush_lsn,
       r.replay_lsn::text AS replay_lsn,
       pg_wal_lsn_diff(pg_current_wal_lsn(), r.sent_lsn)::bigint AS sent_lag_bytes,
       pg_wal_lsn_diff(pg_current_wal_lsn(), r.replay_lsn)::bigint AS lag_bytes,
       extract(epoch FROM r.write_lag)::float8 AS write_lag_seconds,
       extract(epoch FROM r.flush_lag)::float8 AS flush_lag_seconds,
       extract(epoch FROM r.replay_lag)::float8 AS replay_lag_seconds,
       s.slot_name
FROM pg_stat_replication r LEFT JOIN pg_replication_slots s ON s.active_pid = r.pid
ORDER BY r.application_name, r.pid
"""
_SLOTS_QUERY = """
SELECT slot_name, slot_type, active, restart_lsn::text AS restart_lsn, wal_status, safe_wal_size,
       CASE WHEN pg_is_in_recovery() THEN NULL
            ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint END AS retained_bytes
FROM pg_replication_slots ORDER BY slot_name
"""


@dataclass
class NodeState:
    name: str
    reachable: bool = False
    error: str | None = None
    responded: bool = False    # the server answered, even if only to refuse us (wrong password...)
    in_recovery: bool | None = None
    version: str | None = None
    system_identifier: str | None = None
    timeline: int | None = None
    current_lsn: str | None = None
    receive_lsn: str | None = None
    replay_lsn: str | None = None
    replay_age_seconds: float | None = None
    replay_paused: bool | None = None
    read_only: bool | None = None
    synchronous_standby_names: str | None = None
    wal_receiver: dict | None = None
    senders: list = field(default_factory=list)
    slots: list = field(default_factory=list)

    @property
    def role(self):
        if not self.reachable:
            return "down"
        return "standby" if self.in_recovery else "primary"


@dataclass
class Standby:
    """One standby as the pair sees it: its own view joined with its primary's pg_stat_replication row."""

    name: str
    reachable: bool
    state: str | None = None           # streaming, catchup, ... (primary's view) or None when not connected
    receiver_status: str | None = None  # the standby's wal receiver: streaming, stopping, ...
    sent_lsn: str | None = None
    write_lsn: str | None = None
    flush_lsn: str | None = None
    replay_lsn: str | None = None
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    sync_state: str | None = None
    slot_name: str | None = None
    replay_paused: bool | None = None


@dataclass
class Snapshot:
    nodes: list
    standbys: list = field(default_factory=list)
    recorded_primary: str | None = None  # the node dbdeck's last role change made the primary (roles.py)

    @property
    def primaries(self):
        return [n for n in self.nodes if n.role == "primary"]

    @property
    def primary(self):
        primaries = self.primaries
        return primaries[0] if len(primaries) == 1 else None

    def node(self, name):
        return next(n for n in self.nodes if n.name == name)

    def as_dict(self):
        return {"nodes": [dict(asdict(n), role=n.role) for n in self.nodes],
                "standbys": [asdict(s) for s in self.standbys]}


def probe_node(node, timeout=5):
    state = NodeState(node.name)
    try:
        from psycopg.rows import dict_row

        with node.connect(timeout=timeout) as conn, node.endpoint.driver_errors("query"):
            conn.execute(f"SET statement_timeout = '{int(timeout * 1000)}ms'")
            with conn.cursor(row_factory=dict_row) as cur:
                row = cur.execute(_NODE_QUERY).fetchone()
                for key, value in row.items():
                    setattr(state, key, value)
                if state.in_recovery:
                    state.wal_receiver = cur.execute(_RECEIVER_QUERY).fetchone()
                else:
                    state.senders = cur.execute(_SENDERS_QUERY).fetchall()
                state.slots = [dict(s, safe_wal_size=int(s["safe_wal_size"]) if s["safe_wal_size"] is not None
                                    else None) for s in cur.execute(_SLOTS_QUERY).fetchall()]
        state.reachable = True
    except DbdeckError as exc:
        state.error = secrets.mask(str(exc))
        # "FATAL: password authentication failed" comes from a live server; "Connection refused" does not
        state.responded = "FATAL:" in state.error or "ERROR:" in state.error
    if state.reachable:
        state.responded = True
    return state


def probe(nodes, timeout=5):
    """A Snapshot of every node, probed in parallel so a dead node costs one timeout, not one per node."""
    with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
        states = list(pool.map(lambda n: probe_node(n, timeout), nodes))
    snapshot = Snapshot(states)
    snapshot.standbys = _join_standbys(snapshot)
    return snapshot


def _join_standbys(snapshot):
    """Pair each non-primary node with its primary's pg_stat_replication row (by slot, else the only one)."""
    primary = snapshot.primary
    senders = list(primary.senders) if primary else []
    standbys = []
    others = [n for n in snapshot.nodes if n.role != "primary"]
    for node in others:
        entry = Standby(node.name, node.reachable, replay_paused=node.replay_paused)
        receiver = node.wal_receiver or {}
        entry.receiver_status = receiver.get("status")
        row = None
        slot = receiver.get("slot_name")
        if slot:
            row = next((s for s in senders if s.get("slot_name") == slot), None)
        if row is None and node.reachable and receiver and len(senders) == 1 and len(others) == 1:
            row = senders[0]
        if row is not None:
            senders.remove(row)
            entry.state, entry.sync_state, entry.slot_name = row["state"], row["sync_state"], row["slot_name"]
            for key in ("sent_lsn", "write_lsn", "flush_lsn", "replay_lsn"):
                setattr(entry, key, row[key])
            entry.lag_bytes = max(0, int(row["lag_bytes"] or 0)) if row["lag_bytes"] is not None else None
            entry.lag_seconds = _lag_seconds(entry.lag_bytes, row["replay_lag_seconds"], node.replay_age_seconds)
        standbys.append(entry)
    return standbys


def _lag_seconds(lag_bytes, replay_lag_seconds, replay_age_seconds):
    """0 when the standby has replayed everything (an idle primary is not 'behind'); otherwise the
    primary's measured replay_lag, falling back to the age of the last replayed commit."""
    if lag_bytes == 0:
        return 0.0
    if replay_lag_seconds is not None:
        return float(replay_lag_seconds)
    return float(replay_age_seconds) if replay_age_seconds is not None else None


@dataclass
class Thresholds:
    warn_lag_bytes: int | None = 16 * 1024**2
    crit_lag_bytes: int | None = None
    warn_lag_seconds: float | None = None
    crit_lag_seconds: float | None = 30
    synchronous_standby_names: str | None = None  # what the primary should run with once a standby streams


def evaluate(snapshot, thresholds):
    """(status, problems): the worst status and one line per problem, worst first."""
    problems = []

    def add(status, text):
        problems.append((status, text))

    primaries = snapshot.primaries
    down = [n for n in snapshot.nodes if not n.reachable]
    if len(primaries) > 1:
        add(CRITICAL, f"SPLIT-BRAIN: {len(primaries)} nodes accept writes: "
                      f"{split_brain_advice(primaries, snapshot.recorded_primary)}")
    elif not primaries:
        add(CRITICAL, "no primary: no reachable node accepts writes")
    for node in down:
        add(CRITICAL, f"{node.name} is down: {node.error}")
    primary = snapshot.primary
    if primary is not None:
        if not primary.senders:
            add(CRITICAL, f"no standby is connected to primary {primary.name}")
        for standby in snapshot.standbys:
            if not standby.reachable:
                continue
            if standby.state is None:
                detail = f"wal receiver {standby.receiver_status}" if standby.receiver_status else "no wal receiver"
                add(CRITICAL, f"standby {standby.name} is not streaming from {primary.name} ({detail})")
                continue
            if standby.state != "streaming":
                add(WARNING, f"standby {standby.name} is in state {standby.state}")
            _check_lag(add, standby, thresholds)
            if standby.replay_paused:
                add(WARNING, f"standby {standby.name}: WAL replay is paused (pg_wal_replay_resume() resumes it)")
        _check_synchronous(add, primary, snapshot.standbys, thresholds.synchronous_standby_names)
        for slot in primary.slots:
            if slot["wal_status"] == "lost":
                add(CRITICAL, f"slot {slot['slot_name']} lost WAL its standby needs: rebuild the standby")
            elif slot["slot_type"] == "physical" and not slot["active"]:
                add(WARNING, f"slot {slot['slot_name']} is inactive and retains "
                             f"{_size(slot['retained_bytes'])} of WAL")
            elif slot["wal_status"] == "unreserved":
                add(WARNING, f"slot {slot['slot_name']} is about to lose WAL (wal_status unreserved)")
        for node in snapshot.nodes:
            if (node.reachable and node.in_recovery and node.system_identifier
                    and node.system_identifier != primary.system_identifier):
                add(CRITICAL, f"{node.name} is a copy of a different cluster (system identifier "
                              f"{node.system_identifier}, primary's {primary.system_identifier})")
    status = max((s for s, _ in problems), default=OK)
    problems.sort(key=lambda p: -p[0])
    return status, [text for _, text in problems]


def split_brain_advice(primaries, recorded=None):
    """Which primary to stop: every one but the node dbdeck last made the primary (its record), whatever the
    timelines say (a restored copy promotes onto a newer timeline without being the pair's primary)."""
    where = ", ".join(f"{n.name} (timeline {n.timeline}, LSN {n.current_lsn})" for n in primaries)
    if recorded in {n.name for n in primaries}:
        stale = [n.name for n in primaries if n.name != recorded]
        return (f"{where}; {recorded} is the primary dbdeck's last role change made, so stop "
                f"{', '.join(stale)} now and rebuild it as a standby (rebuild-replica --node {stale[0]}) after "
                f"saving anything written only there")
    return (f"{where}; dbdeck has no record of which is the primary: neither gets the write endpoint; stop the "
            f"one that should not take writes now and rebuild it as a standby")


def _check_synchronous(add, primary, standbys, wanted):
    """Synchronous replication silently lost (a role change that left '' behind) is a warning: a crash of
    the primary would then lose acknowledged commits."""
    streaming = [s for s in standbys if s.state == "streaming"]
    if not wanted or not streaming:
        return
    if primary.synchronous_standby_names != wanted:
        add(WARNING, f"primary {primary.name} runs synchronous_standby_names = "
                     f"'{primary.synchronous_standby_names}', configured '{wanted}': commits do not wait for the "
                     f"standby (switchover or setup-master sets it again)")
    elif not any(s.sync_state in ("sync", "quorum") for s in streaming):
        add(WARNING, f"no standby is synchronous on {primary.name} (synchronous_standby_names = '{wanted}' matches "
                     f"none of: {', '.join(s.name for s in streaming)})")


def _check_lag(add, standby, t):
    name, lag_b, lag_s = standby.name, standby.lag_bytes, standby.lag_seconds
    if t.crit_lag_seconds is not None and lag_s is not None and lag_s > t.crit_lag_seconds:
        add(CRITICAL, f"standby {name} lags {lag_s:.1f}s (critical over {t.crit_lag_seconds:g}s)")
    elif t.crit_lag_bytes is not None and lag_b is not None and lag_b > t.crit_lag_bytes:
        add(CRITICAL, f"standby {name} lags {_size(lag_b)} (critical over {_size(t.crit_lag_bytes)})")
    elif t.warn_lag_seconds is not None and lag_s is not None and lag_s > t.warn_lag_seconds:
        add(WARNING, f"standby {name} lags {lag_s:.1f}s (warning over {t.warn_lag_seconds:g}s)")
    elif t.warn_lag_bytes is not None and lag_b is not None and lag_b > t.warn_lag_bytes:
        add(WARNING, f"standby {name} lags {_size(lag_b)} (warning over {_size(t.warn_lag_bytes)})")


def _size(value):
    from .model import format_size

    return format_size(value)


def lsn_to_int(lsn):
    """'16/B374D848' -> the byte position, for metrics and comparisons."""
    if not lsn:
        return None
    high, low = lsn.split("/")
    return (int(high, 16) << 32) + int(low, 16)
