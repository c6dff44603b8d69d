"""check-replication, setup-master, promote-replica, rebuild-replica against real local pairs (pg_ctl driver).

Every pair here is built by the commands under test: a fresh primary (initdb), `setup-master` on it,
then `rebuild-replica` turning an empty directory into its streaming standby.
"""

import json
import stat
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml


from ..conftest import BIN, wait_for
from .conftest import write_pair_config as _write_config

pytestmark = pytest.mark.integration


def _secret_free(pair, *texts):
    password = pair.password_file.read_text().strip()
    for text in texts:
        assert password not in text
        assert pair.primary.password not in text
    for log in pair.log_dir.glob("*.log"):
        assert password not in log.read_text()


def test_setup_master_and_rebuild_build_a_streaming_pair(readme_pair):
    pair = readme_pair
    mode = stat.S_IMODE(pair.password_file.stat().st_mode)
    assert mode == 0o600
    roles = pair.sql(pair.alpha_port, "SELECT rolreplication, rolcanlogin FROM pg_roles WHERE rolname = 'replicator'")
    assert roles == [(True, True)]
    assert pair.sql(pair.alpha_port, "SELECT slot_type FROM pg_replication_slots WHERE slot_name = 'replica_slot'") \
        == [("physical",)]
    hba = Path(pair.sql(pair.alpha_port, "SHOW hba_file")[0][0]).read_text()
    assert hba.count("replication    replicator    127.0.0.2/32") == 1

    # idempotent: a second run changes nothing
    again = pair.run("setup-master")
    assert again.returncode == 0, again.stderr
    assert "password matches" in again.stdout and "already allowed" in again.stdout and "present" in again.stdout
    assert Path(pair.sql(pair.alpha_port, "SHOW hba_file")[0][0]).read_text() == hba

    # the standby replays what the primary writes, and reads work on it (hot standby)
    pair.sql(pair.alpha_port, "CREATE TABLE t AS SELECT 42 AS answer")
    assert wait_for(lambda: _standby_has(pair, "SELECT answer FROM t", [(42,)]), timeout=15)

    code, report, result = pair.check()
    assert code == 0, result.stdout
    assert report["status"] == "OK" and report["primary"] == "alpha"
    nodes = {n["name"]: n for n in report["nodes"]}
    assert nodes["alpha"]["in_recovery"] is False and nodes["beta"]["in_recovery"] is True
    assert nodes["alpha"]["timeline"] == nodes["beta"]["timeline"] == 1
    (standby,) = report["standbys"]
    assert standby["name"] == "beta" and standby["state"] == "streaming"
    for key in ("sent_lsn", "write_lsn", "flush_lsn", "replay_lsn"):
        assert "/" in standby[key]
    assert standby["lag_bytes"] == 0 and standby["lag_seconds"] == 0.0  # idle primary: 0, not "time since commit"
    (slot,) = nodes["alpha"]["slots"]
    assert slot["slot_name"] == "replica_slot" and slot["active"] is True and slot["retained_bytes"] >= 0
    assert "safe_wal_size" in slot
    text = pair.run("check-replication")
    assert text.returncode == 0 and text.stdout.startswith("REPLICATION OK - primary alpha")
    assert list(pair.log_dir.glob("rebuild-replica-*.log"))
    _secret_free(pair, again.stdout + again.stderr, text.stdout)


def _standby_has(pair, query, expected):
    try:
        return pair.sql(pair.beta_port, query) == expected
    except Exception:
        return False


def _table(text):
    """The rows of check-replication's member table: header line first, split on runs of spaces."""
    import re

    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:3] == ["Member", "Host", "Role"])
    return [re.split(r"\s{2,}", line.strip()) for line in lines[start:start + 3]]


def test_check_is_critical_when_the_standby_is_down(local_pair):
    pair = local_pair
    healthy = pair.run("check-replication", env={"NO_COLOR": "1"})
    assert healthy.returncode == 0 and healthy.stdout.startswith("REPLICATION OK - "), healthy.stdout
    header, alpha, beta = _table(healthy.stdout)
    assert header == ["Member", "Host", "Role", "State", "TL", "LSN", "Lag"], header
    assert alpha[:5] == ["alpha", f"127.0.0.1:{pair.alpha_port}", "primary", "accepting writes", "1"], alpha
    assert beta[:5] == ["beta", f"127.0.0.1:{pair.beta_port}", "standby", "streaming (async)", "1"], beta
    assert "\x1b[" not in healthy.stdout  # no colour off a terminal
    pair.standby_server.stop()
    down = pair.run("check-replication")
    assert down.returncode == 2 and _table(down.stdout)[2][:3] == ["beta", f"127.0.0.1:{pair.beta_port}", "?"]
    assert "DOWN" in _table(down.stdout)[2][3]
    code, report, _ = pair.check()
    assert code == 2 and report["status"] == "CRITICAL"
    assert any("beta is down" in p for p in report["problems"])
    assert any("no standby is connected" in p for p in report["problems"])
    metrics = pair.run("check-replication", "--format", "prometheus")
    assert metrics.returncode == 2
    assert 'pg_up{node="beta"} 0.0' in metrics.stdout
    # the seed's PostgresReplicaOffline alert is absent(pg_stat_replication_replay_lsn)
    assert "pg_stat_replication_replay_lsn" not in metrics.stdout


def test_check_warns_on_artificial_lag(local_pair):
    pair = local_pair
    pair.sql(pair.beta_port, "SELECT pg_wal_replay_pause()")
    pair.sql(pair.alpha_port, "CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 2000) g")
    code, report, result = pair.check("--warn-lag-bytes", "64kB", "--crit-lag-seconds", "3600")
    assert code == 1, result.stdout
    assert report["status"] == "WARNING"
    (standby,) = report["standbys"]
    assert standby["lag_bytes"] > 64 * 1024
    assert any("lags" in p for p in report["problems"])
    pair.sql(pair.beta_port, "SELECT pg_wal_replay_resume()")
    assert wait_for(lambda: pair.check("--warn-lag-bytes", "64kB")[0] == 0, timeout=20)


def test_check_reports_split_brain_and_rebuild_refuses_to_guess(local_pair):
    pair = local_pair
    pair.sql(pair.beta_port, "SELECT pg_promote()")
    assert wait_for(lambda: pair.sql(pair.beta_port, "SELECT pg_is_in_recovery()") == [(False,)], timeout=20)
    code, report, _ = pair.check()
    assert code == 2
    assert report["problems"][0].startswith("SPLIT-BRAIN: 2 nodes accept writes")
    refused = pair.run("rebuild-replica")
    assert refused.returncode == 1 and "split-brain" in refused.stderr and "--node" in refused.stderr
    # choosing explicitly works: beta is thrown away and streams from alpha again
    rebuilt = pair.run("rebuild-replica", "--node", "beta")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert pair.check()[0] == 0


def test_promote_refused_while_primary_up_then_failover_and_rebuild_old_primary(local_pair):
    pair = local_pair
    env_file = pair.base / "app.env"
    env_file.write_text(f"NODE_ENV=production\nDATABASE_URL=postgresql://app:s3cret@127.0.0.1:{pair.alpha_port}/crm\n")
    _write_config(pair.config, pair.base, pair.primary, pair.beta_port, pair.password_file, pair.log_dir,
                  extra={"after_promote": {"env_files": [str(env_file)]}})
    pair.sql(pair.alpha_port, "CREATE TABLE orders (id int PRIMARY KEY)")
    pair.sql(pair.alpha_port, "INSERT INTO orders SELECT generate_series(1, 100)")

    refused = pair.run("promote-replica")
    assert refused.returncode == 1
    assert "still answers" in refused.stderr
    assert pair.sql(pair.beta_port, "SELECT pg_is_in_recovery()") == [(True,)]

    dry = pair.run("promote-replica", "--dry-run")
    assert dry.returncode == 1  # a dry run also refuses while the primary is up

    assert wait_for(lambda: _standby_has(pair, "SELECT count(*) FROM orders", [(100,)]), timeout=15)
    pair.primary.server.stop(mode="immediate")
    promoted = pair.run("promote-replica", "--update-connections")
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    assert "last received" in promoted.stdout and "accepts writes" in promoted.stdout
    pair.sql(pair.beta_port, "INSERT INTO orders SELECT generate_series(101, 150)")  # writes succeed
    assert f"@127.0.0.1:{pair.beta_port}/crm" in env_file.read_text()
    assert "NODE_ENV=production" in env_file.read_text()
    failover_logs = [log.read_text() for log in sorted(pair.log_dir.glob("failover-*.log"))]
    assert len(failover_logs) == 2  # the refused run and the promotion (a dry run writes no log)
    assert any("still answers" in text and "ERROR" in text for text in failover_logs)  # refusals are logged too
    assert any("is the primary now" in text and text.rstrip().endswith("done") for text in failover_logs)

    # the old primary comes back as a standby of the new one, with the rows written meanwhile
    pair.primary.server.start()
    split = pair.check()[1]["problems"][0]
    assert split.startswith("SPLIT-BRAIN") and "beta is the primary dbdeck's last role change made, so stop alpha" \
        in split, split
    refused = pair.run("rebuild-replica")
    assert refused.returncode == 1 and "--node alpha" in refused.stderr
    rebuilt = pair.run("rebuild-replica", "--node", "alpha")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert pair.sql(pair.alpha_port, "SELECT pg_is_in_recovery(), count(*) FROM orders") == [(True, 150)]
    code, report, _ = pair.check()
    assert code == 0 and report["primary"] == "beta"
    assert not list(Path(pair.primary.server.datadir).glob(".dbdeck-*"))  # old copy deleted after success
    _secret_free(pair, promoted.stdout + promoted.stderr, rebuilt.stdout + rebuilt.stderr)

    history = pair.run("dbdeck", "history", "--since", "1h", "--format", "json")
    kinds = [e["kind"] for e in json.loads(history.stdout)]
    assert kinds.index("failover.promoted") < len(kinds) - 1 - kinds[::-1].index("rebuild.done")
    text = pair.run("dbdeck", "history", "--kind", "rebuild")
    assert text.returncode == 0 and "rebuild.done" in text.stdout and "alpha rebuilt" in text.stdout
    assert "failover.promoted" not in text.stdout
    status = pair.run("dbdeck", "status", "--format", "json")
    rows = {(r["kind"], r["name"]): r for r in json.loads(status.stdout)}
    assert rows[("replication", "pair")]["state"] == "ok" and rows[("replication", "pair")]["data"]["primary"] == "beta"


def test_rebuild_refuses_the_only_primary_and_dry_run_changes_nothing(local_pair):
    pair = local_pair
    refused = pair.run("rebuild-replica", "--node", "alpha")
    assert refused.returncode == 1 and "only primary" in refused.stderr
    before = sorted(p.name for p in Path(pair.standby_server.datadir).iterdir())
    dry = pair.run("rebuild-replica", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "pg_basebackup" in dry.stdout and "PGPASSWORD=***" in dry.stdout
    assert pair.password_file.read_text().strip() not in dry.stdout
    assert sorted(p.name for p in Path(pair.standby_server.datadir).iterdir()) == before
    assert pair.check()[0] == 0


def test_failed_rebuild_puts_the_old_standby_back(local_pair):
    pair = local_pair
    good = pair.password_file.read_text()
    pair.password_file.write_text("wrong-password\n")
    failed = pair.run("rebuild-replica")
    assert failed.returncode == 1
    assert "putting the old data directory back" in failed.stdout + failed.stderr
    datadir = Path(pair.standby_server.datadir)
    assert (datadir / "PG_VERSION").exists() and not list(datadir.glob(".dbdeck-*"))
    pair.password_file.write_text(good)
    assert pair.wait_healthy(timeout=30)  # started again on its old data, streaming


def test_prometheus_exposition_and_serve(local_pair):
    from dbdeck.plugins.sandbox.servers import free_port

    pair = local_pair
    metrics = pair.run("check-replication", "--format", "prometheus")
    assert metrics.returncode == 0
    for name in ("pg_replication_lag_seconds", "pg_stat_replication_replay_lsn", "pg_replication_lag_bytes",
                 "pg_replication_slot_retained_wal_bytes", "pg_up", "pg_replication_is_primary"):
        assert f"\n{name}{{" in "\n" + metrics.stdout, name
    textfile = pair.base / "replication.prom"
    written = pair.run("check-replication", "--format", "prometheus", "--output", str(textfile))
    assert written.returncode == 0 and written.stdout == ""
    assert "pg_replication_lag_seconds{" in textfile.read_text()
    port = free_port()
    server = subprocess.Popen([str(BIN / "check-replication"), "--config", str(pair.config), "--serve",
                               f"127.0.0.1:{port}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def scrape():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                return None

        assert wait_for(scrape, timeout=15)
        assert 'pg_replication_is_primary{node="alpha"} 1.0' in scrape()
        pair.standby_server.stop()
        # scrapes within a second share one probe; the next probe sees the standby gone
        assert wait_for(lambda: "pg_stat_replication_replay_lsn" not in scrape(), timeout=5)
    finally:
        server.terminate()
        assert server.wait(timeout=10) == 0


def test_bad_configuration_is_unknown_and_changes_nothing(local_pair, tmp_path):
    pair = local_pair
    bad = tmp_path / "bad.yaml"
    bad.write_text("replication:\n  nodes:\n    a: {driver: docker}\n")
    result = subprocess.run([str(BIN / "check-replication"), "--config", str(bad)], capture_output=True, text=True)
    assert result.returncode == 3 and result.stdout.startswith("REPLICATION UNKNOWN")
    assert "container" in result.stdout
    setup = subprocess.run([str(BIN / "setup-master"), "--config", str(bad)], capture_output=True, text=True)
    assert setup.returncode == 2 and "container" in setup.stderr
    wrong_password = yaml.safe_load(pair.config.read_text())
    wrong_password["replication"]["nodes"]["alpha"]["endpoint"]["password"] = "nope"
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(wrong_password))
    result = subprocess.run([str(BIN / "promote-replica"), "--config", str(tmp_path / "wrong.yaml")],
                            capture_output=True, text=True)
    # alpha refuses dbdeck's login but is alive: it may still take the apps' writes, so no promotion
    assert result.returncode == 1 and "answers but refuses" in result.stderr, result.stderr
    assert "nope" not in result.stdout + result.stderr
    assert pair.sql(pair.beta_port, "SELECT pg_is_in_recovery()") == [(True,)]


def test_setup_master_apply_settings_reports_the_restart(workdir):
    from dbdeck.plugins.sandbox.servers import free_port, give_to

    from ..conftest import _start_postgres

    base = workdir / "apply-settings"
    give_to(base, None, 0o755)
    primary = _start_postgres(base, "alpha", settings={"wal_log_hints": "off"})
    try:
        config = base / "dbdeck.yaml"
        _write_config(config, base, primary, free_port(), base / "secrets" / "replicator", base / "logs")
        run = lambda *args: subprocess.run([str(BIN / "setup-master"), "--config", str(config), *args],  # noqa: E731
                                           capture_output=True, text=True, timeout=120)
        report = run()
        assert report.returncode == 0, report.stderr  # wal_log_hints is advice, not a blocker
        assert "warn wal_log_hints = off" in report.stdout and "--apply-settings" in report.stdout
        applied = run("--apply-settings")
        assert applied.returncode == 1 and "RESTART the primary for wal_log_hints" in applied.stderr
        primary.server.stop()
        primary.server.start()
        after = run()
        assert after.returncode == 0 and "ok   wal_log_hints = on" in after.stdout, after.stdout
    finally:
        primary.server.destroy()


def test_promote_with_fence_makes_a_standby_the_primary_in_one_command_and_the_record_follows(local_pair):
    """Issue 29.1's last step: the one command that makes a copy (a restored one, say) the primary while the
    old primary runs: --fence stops every other writable node first, and dbdeck's record of the primary
    (which the write endpoint and check-replication go by) names the new one."""
    pair = local_pair
    pair.sql(pair.alpha_port, "CREATE TABLE fenced AS SELECT generate_series(1, 10) AS id")
    record = Path(yaml.safe_load(pair.config.read_text())["dbdeck"]["state_dir"]) / "replication" / "primary.json"
    assert json.loads(record.read_text())["primary"] == "alpha"  # setup-master recorded it
    assert wait_for(lambda: pair.sql(pair.beta_port, "SELECT count(*) FROM fenced") == [(10,)], timeout=15)
    no_node = pair.run("promote-replica", "--fence")
    assert no_node.returncode == 2 and "--fence needs --node" in no_node.stderr, no_node.stderr
    dry = pair.run("promote-replica", "--fence", "--node", "beta", "--dry-run")
    assert dry.returncode == 0 and "fencing alpha" in dry.stdout + dry.stderr, dry.stdout + dry.stderr
    assert pair.primary.server.is_running() and pair.sql(pair.beta_port, "SELECT pg_is_in_recovery()") == [(True,)]
    assert json.loads(record.read_text())["primary"] == "alpha", "a dry run changed the record"

    promoted = pair.run("promote-replica", "--fence", "--node", "beta")
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    assert not pair.primary.server.is_running(), "alpha was not fenced"
    assert pair.sql(pair.beta_port, "SELECT pg_is_in_recovery()") == [(False,)]
    assert json.loads(record.read_text())["primary"] == "beta"
    assert "rebuild-replica" in promoted.stdout
    rebuilt = pair.run("rebuild-replica", "--node", "alpha")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert pair.wait_healthy(timeout=30), pair.check()[1]
    assert pair.check()[1]["primary"] == "beta"
    assert pair.sql(pair.alpha_port, "SELECT pg_is_in_recovery(), count(*) FROM fenced") == [(True, 10)]
