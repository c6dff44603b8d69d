"""The Patroni-compatible health answers of the native pair, and the HAProxy configuration around them."""

import pytest

from dbdeck.plugins.replication.cluster import NodeState, Snapshot, Standby
from dbdeck.plugins.replication.health import answer, leader


def node(name, in_recovery, timeline=1, **extra):
    fields = dict(reachable=True, responded=True, in_recovery=in_recovery, timeline=timeline, version="15.8",
                  read_only=False, current_lsn=None if in_recovery else "0/5000000",
                  receive_lsn="0/5000000" if in_recovery else None, replay_lsn="0/4F00000" if in_recovery else None,
                  wal_receiver={"status": "streaming"} if in_recovery else None)
    return NodeState(name, **{**fields, **extra})


def pair(lag=1024, sync="sync"):
    return Snapshot([node("a", False), node("b", True)],
                    [Standby("b", True, state="streaming", lag_bytes=lag, sync_state=sync)])


@pytest.mark.parametrize("path", ["/primary", "/master", "/leader", "/read-write", "/"])
def test_only_the_writable_node_is_primary(path):
    assert answer(path, {}, pair(), "a")[0] == 200
    code, body = answer(path, {}, pair(), "b")
    assert code == 503 and body["role"] == "replica"


def test_replica_lag_threshold_in_bytes_or_units():
    assert answer("/replica", {}, pair(), "b")[0] == 200
    assert answer("/replica", {"lag": "1kB"}, pair(lag=1024), "b")[0] == 200
    code, body = answer("/replica", {"lag": "1000"}, pair(lag=1024), "b")
    assert code == 503 and "over 1000" in body["reason"]
    assert answer("/replica", {"lag": "lots"}, pair(), "b")[0] == 400
    assert answer("/replica", {}, pair(), "a")[0] == 503


def test_replica_lag_without_a_primary_is_what_it_has_not_replayed():
    alone = Snapshot([NodeState("a", error="connection refused"), node("b", True)], [Standby("b", True)])
    code, body = answer("/replica", {"lag": "2MB"}, alone, "b")
    assert code == 200 and body["lag"] == 0x100000
    assert answer("/replica", {"lag": "1000kB"}, alone, "b")[0] == 503
    assert answer("/primary", {}, alone, "a")[0] == 503
    code, body = answer("/health", {}, alone, "a")
    assert code == 503 and body["state"] == "unreachable" and "does not answer" in body["error"]


def test_an_unreachable_node_s_driver_error_is_never_in_an_answer():
    """Health ports answer anyone: the driver's message names the admin user, host, port and database."""
    error = 'connection to server at "10.0.0.9", port 5432 failed: FATAL: password authentication failed ' \
            'for user "postgres" (database "crm")'
    alone = Snapshot([NodeState("a", error=error), node("b", True)], [Standby("b", True)])
    for path in ("/health", "/primary", "/replica", "/liveness", "/nope"):
        text = str(answer(path, {}, alone, "a")[1])
        assert "10.0.0.9" not in text and "postgres" not in text and "crm" not in text, (path, text)


@pytest.mark.parametrize("value", ["", "lots", "9" * 400, "1e3", "-5"])
def test_a_bad_lag_value_is_a_400_not_a_503(value):
    code, body = answer("/replica", {"lag": value}, pair(), "b")
    assert code == 400 and body["reason"].startswith("lag:"), body


def test_read_only_sync_async_liveness_readiness():
    assert answer("/read-only", {}, pair(), "a")[0] == 200
    assert answer("/read-only", {}, pair(), "b")[0] == 200
    assert answer("/sync", {}, pair(), "b")[0] == 200
    assert answer("/async", {}, pair(), "b")[0] == 503
    assert answer("/async", {}, pair(sync="async"), "b")[0] == 200
    assert answer("/readiness", {}, pair(), "b")[0] == 200
    assert answer("/liveness", {}, pair(), "b")[0] == 200
    assert answer("/nope", {}, pair(), "a")[0] == 404


def test_a_read_only_primary_gets_no_writes():
    snapshot = Snapshot([node("a", False, read_only=True), node("b", True)], [Standby("b", True)])
    assert leader(snapshot) is None
    assert answer("/primary", {}, snapshot, "a")[0] == 503


def test_split_brain_routes_writes_to_the_recorded_primary_never_by_timeline():
    """Issue 29.1: a copy restored into b promotes onto timeline 2 while a (timeline 1) is the pair's
    primary: the record of dbdeck's last role change decides, not the newer timeline."""
    restored = Snapshot([node("a", False, timeline=1), node("b", False, timeline=2)], recorded_primary="a")
    assert answer("/primary", {}, restored, "a")[0] == 200
    code, body = answer("/primary", {}, restored, "b")
    assert code == 503 and "a is the primary dbdeck's last role change made" in body["reason"]
    failed_over = Snapshot([node("a", False, timeline=1), node("b", False, timeline=2)], recorded_primary="b")
    assert [answer("/primary", {}, failed_over, n)[0] for n in "ab"] == [503, 200]
    for unknown in (None, "c"):  # no record, or one naming neither: nobody gets writes
        snapshot = Snapshot([node("a", False, timeline=1), node("b", False, timeline=2)], recorded_primary=unknown)
        assert [answer("/primary", {}, snapshot, n)[0] for n in "ab"] == [503, 503]
    alone = Snapshot([node("a", True), node("b", False, timeline=2)], recorded_primary="a")
    assert answer("/primary", {}, alone, "b")[0] == 200, "the only writable node is the primary"


def test_check_replication_tells_to_stop_the_unrecorded_primary():
    from dbdeck.plugins.replication.cluster import split_brain_advice

    a, b = node("a", False, timeline=1), node("b", False, timeline=2)
    advice = split_brain_advice([a, b], "a")
    assert "stop b now" in advice and "rebuild-replica --node b" in advice
    assert "no record" in split_brain_advice([a, b], None)
