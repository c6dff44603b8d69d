"""Verdict rules, sizes, SCRAM verification, pg_hba coverage, URL rewriting and metrics, without servers."""

import pytest

from dbdeck.plugins.replication.cluster import (
    CRITICAL, OK, WARNING, NodeState, Snapshot, Standby, Thresholds, _lag_seconds, evaluate, lsn_to_int)
from dbdeck.plugins.replication.model import parse_size
from dbdeck.plugins.replication.promote import rewrite_url
from dbdeck.plugins.replication.setup import _hba_allows, scram_matches

SLOT = {"slot_name": "replica_slot", "slot_type": "physical", "active": True, "restart_lsn": "0/3000000",
        "wal_status": "reserved", "safe_wal_size": None, "retained_bytes": 0}


def _primary(**extra):
    fields = dict(reachable=True, responded=True, in_recovery=False, timeline=1, current_lsn="0/3000100",
                  system_identifier="7", senders=[{"state": "streaming"}], slots=[dict(SLOT)])
    return NodeState("a", **{**fields, **extra})


def _standby_node(**extra):
    return NodeState("b", reachable=True, responded=True, in_recovery=True, timeline=1, system_identifier="7",
                     **extra)


def _healthy(lag_bytes=0, lag_seconds=0.0, state="streaming"):
    return Snapshot([_primary(), _standby_node()],
                    [Standby("b", True, state=state, receiver_status="streaming", lag_bytes=lag_bytes,
                             lag_seconds=lag_seconds, slot_name="replica_slot")])


def test_healthy_pair_is_ok():
    assert evaluate(_healthy(), Thresholds()) == (OK, [])


def test_lag_thresholds():
    t = Thresholds(warn_lag_bytes=1024, crit_lag_seconds=30)
    assert evaluate(_healthy(lag_bytes=2048, lag_seconds=1), t)[0] == WARNING
    assert evaluate(_healthy(lag_bytes=2048, lag_seconds=31), t)[0] == CRITICAL
    assert evaluate(_healthy(lag_bytes=512, lag_seconds=1), t)[0] == OK
    assert evaluate(_healthy(lag_bytes=10, lag_seconds=5), Thresholds(warn_lag_seconds=4))[0] == WARNING
    assert evaluate(_healthy(lag_bytes=10**9), Thresholds(crit_lag_bytes=10**8))[0] == CRITICAL


def test_idle_primary_has_zero_lag_seconds():
    # replayed everything: an hour since the last commit is not an hour of lag
    assert _lag_seconds(0, None, 3600.0) == 0.0
    assert _lag_seconds(100, 0.25, 3600.0) == 0.25
    assert _lag_seconds(100, None, 2.0) == 2.0


def test_standby_down_no_standby_and_not_streaming_are_critical():
    down = Snapshot([_primary(senders=[]), NodeState("b", error="connection refused")], [Standby("b", False)])
    status, problems = evaluate(down, Thresholds())
    assert status == CRITICAL and any("b is down" in p for p in problems)
    assert any("no standby is connected" in p for p in problems)
    detached = Snapshot([_primary(senders=[]), _standby_node()], [Standby("b", True, receiver_status="waiting")])
    status, problems = evaluate(detached, Thresholds())
    assert status == CRITICAL and any("not streaming" in p for p in problems)


def test_two_primaries_are_split_brain_and_the_one_not_recorded_is_named():
    newer = _primary()
    newer.name, newer.timeline = "b", 2
    status, problems = evaluate(Snapshot([_primary(), newer], recorded_primary="a"), Thresholds())
    assert status == CRITICAL
    assert problems[0].startswith("SPLIT-BRAIN") and "so stop b now" in problems[0], problems[0]
    status, problems = evaluate(Snapshot([_primary(), newer]), Thresholds())
    assert status == CRITICAL and "no record of which is the primary" in problems[0]


def test_no_primary_is_critical():
    status, problems = evaluate(Snapshot([_standby_node(), NodeState("a", error="down")]), Thresholds())
    assert status == CRITICAL and "no primary" in problems[0]


def test_slots_and_paused_replay():
    snapshot = _healthy()
    snapshot.nodes[0].slots[0].update(active=False, retained_bytes=5 * 1024**2)
    assert evaluate(snapshot, Thresholds())[0] == WARNING
    snapshot.nodes[0].slots[0]["wal_status"] = "lost"
    assert evaluate(snapshot, Thresholds())[0] == CRITICAL
    paused = _healthy()
    paused.standbys[0].replay_paused = True
    assert evaluate(paused, Thresholds())[0] == WARNING


def test_standby_of_another_cluster_is_critical():
    snapshot = _healthy()
    snapshot.nodes[1].system_identifier = "8"
    assert evaluate(snapshot, Thresholds())[0] == CRITICAL


@pytest.mark.parametrize("text,expected", [("16MB", 16 * 1024**2), ("512kB", 512 * 1024), (" 2 GB", 2 * 1024**3),
                                           ("100", 100), (4096, 4096), ("1.5M", int(1.5 * 1024**2))])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["16 parsecs", "MB", "-1MB", ""])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_lsn_to_int():
    assert lsn_to_int("0/3000100") == 0x3000100
    assert lsn_to_int("16/B374D848") == (0x16 << 32) + 0xB374D848
    assert lsn_to_int(None) is None


def test_scram_verifier_check():
    # a verifier made by PostgreSQL 15 for password 'secret' (CREATE ROLE ... PASSWORD 'secret')
    from psycopg import pq

    conn = pq.PGconn.connect(b"")  # not connected: encrypt_password still works locally for scram
    verifier = conn.encrypt_password(b"secret", b"replicator", b"scram-sha-256").decode()
    assert verifier.startswith("SCRAM-SHA-256$")
    assert scram_matches(verifier, "secret")
    assert not scram_matches(verifier, "Secret")
    assert not scram_matches("md5abcdef", "secret")
    assert not scram_matches(None, "secret")


def _rule(line, databases, users, address, netmask, method="scram-sha-256", kind="host", error=None):
    return (line, kind, databases, users, address, netmask, method, error)


def test_hba_coverage():
    import ipaddress

    net = ipaddress.ip_network("172.18.0.0/16")
    assert _hba_allows([_rule(1, ["replication"], ["all"], "172.16.0.0", "255.240.0.0")], "replicator", net)
    assert not _hba_allows([_rule(1, ["all"], ["all"], "0.0.0.0", "0.0.0.0")], "replicator", net)  # 'all' != replication
    assert not _hba_allows([_rule(1, ["replication"], ["replicator"], "172.18.5.0", "255.255.255.0")], "replicator", net)
    assert not _hba_allows([_rule(1, ["replication"], ["all"], "172.16.0.0", "255.240.0.0", method="reject"),
                            _rule(2, ["replication"], ["all"], "0.0.0.0", "0.0.0.0")], "replicator", net)
    assert _hba_allows([_rule(1, ["replication"], ["other"], "0.0.0.0", "0.0.0.0"),
                        _rule(2, ["replication"], ["replicator"], "all", None)], "replicator", net)


def test_rewrite_url_changes_only_the_old_host():
    url = "postgresql://conecta:senha@postgres:5432/conecta_plus?schema=public"
    assert rewrite_url(url, "postgres:5432", "postgres-replica:5432") == \
        "postgresql://conecta:senha@postgres-replica:5432/conecta_plus?schema=public"
    assert rewrite_url(url, "other:5432", "x:1") is None
    assert rewrite_url("postgresql://localhost:5432/db", "localhost:5432", "localhost:5433") == \
        "postgresql://localhost:5433/db"


def test_metrics_omit_replay_lsn_without_a_streaming_standby():
    from dbdeck.plugins.replication.metrics import exposition

    snapshot = _healthy(lag_bytes=0, lag_seconds=0.0)
    snapshot.standbys[0].replay_lsn = "0/3000100"
    text = exposition(snapshot, OK)
    assert 'pg_stat_replication_replay_lsn{slot="replica_slot",standby="b"} 5.0331904e+07' in text
    assert 'pg_replication_lag_seconds{standby="b"} 0.0' in text
    down = Snapshot([_primary(senders=[]), NodeState("b", error="x")], [Standby("b", False)])
    text = exposition(down, CRITICAL)
    assert "pg_stat_replication_replay_lsn" not in text and "pg_replication_lag_seconds" not in text
    assert 'pg_up{node="b"} 0.0' in text and "pg_replication_check_status 2.0" in text


def test_check_replication_bad_flags_are_unknown_not_critical():
    import subprocess
    from pathlib import Path

    check = Path(__file__).resolve().parents[2] / "bin" / "check-replication"
    for args in (["--bogus"], ["--warn-lag-bytes", "lots"]):
        done = subprocess.run([str(check), *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 3, done.stdout + done.stderr
        assert done.stdout.startswith("REPLICATION UNKNOWN - ")
