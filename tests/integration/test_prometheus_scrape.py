"""What dbdeck serves for Prometheus, scraped by a real Prometheus (Debian's prometheus package): the
guarded /metrics server of `dbdeck status --serve` speaks what Prometheus reads."""

import json
import re
import signal
import subprocess
import urllib.parse
import urllib.request

import pytest
import yaml

from dbdeck.plugins.sandbox.servers import free_port

from ..conftest import BIN, require, wait_for

pytestmark = pytest.mark.integration


def _query(port, expression):
    url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(expression)}"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())["data"]["result"]


def _safe_query(port, expression):
    try:
        return _query(port, expression)
    except OSError:
        return []


def test_prometheus_scrapes_dbdeck_status_serve(tmp_path):
    require("prometheus", "prometheus")
    config = tmp_path / "dbdeck.yaml"
    config.write_text(yaml.safe_dump({"dbdeck": {"state_dir": str(tmp_path / "state"),
                                                 "run_dir": str(tmp_path / "run")},
                                      "scheduler": {"state_dir": str(tmp_path / "scheduler")},
                                      "schedules": {"local-sync": {"cron": "0 */6 * * *"}}}))
    metrics_port, prometheus_port = free_port(), free_port()
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": "dbdeck", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}]}))
    served = subprocess.Popen([str(BIN / "dbdeck"), "--config", str(config), "status", "--serve", f":{metrics_port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    prometheus = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{prometheus_port}"],
                                  stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    try:
        up = lambda: _safe_query(prometheus_port, 'up{job="dbdeck"}')  # noqa: E731
        assert wait_for(lambda: [r["value"][1] for r in up()] == ["1"], timeout=60), \
            (tmp_path / "prometheus.log").read_text()[-2000:]
        problems = _query(prometheus_port, "dbdeck_status_problems")
        assert [r["value"][1] for r in problems] == ["0"], problems
        assert problems[0]["metric"]["job"] == "dbdeck" and problems[0]["metric"]["instance"].endswith(
            f":{metrics_port}")
    finally:
        prometheus.send_signal(signal.SIGTERM)
        prometheus.wait(timeout=30)
        served.send_signal(signal.SIGTERM)
        code = served.wait(timeout=30)
    assert code == 0, served.stderr.read()


def _documented_metrics(section_start, section_end):
    """The metric names the README lists between two markers (each one as users read it)."""
    readme = (BIN.parent / "README.md").read_text()
    text = readme[readme.index(section_start):]
    text = text[:text.index(section_end)]
    names = set()
    for name in re.findall(r"`((?:dbdeck|pg)_[a-z_{},]+)", text):
        match = re.fullmatch(r"([a-z_]*)\{([a-z_,]+)\}([a-z_]*)", name)
        if match and "," in match.group(2):  # pg_stat_replication_{sent,write,flush,replay}_lsn
            names.update(match.group(1) + part + match.group(3) for part in match.group(2).split(","))
        else:
            names.add(name.split("{", 1)[0])
    return names


def test_prometheus_scrape_and_node_exporter_keep_dbdeck_labels_and_alerts_name_the_failing_job(tmp_path,
                                                                                                  local_pair):
    """Debian's prometheus scrapes `dbdeck status --serve`, `check-replication --serve` and Debian's
    prometheus-node-exporter reading `status --output`, with etc/prometheus's rules loaded: every documented
    metric is there with dbdeck's own labels (no exported_job), and the failing job's alert names that job."""
    require("prometheus", "prometheus")
    require("prometheus-node-exporter", "prometheus-node-exporter")
    pair = local_pair
    config = yaml.safe_load(pair.config.read_text())
    config.setdefault("dbdeck", {}).update({"state_dir": str(tmp_path / "state"), "run_dir": str(tmp_path / "run")})
    config["scheduler"] = {"state_dir": str(tmp_path / "scheduler")}
    config["schedules"] = {"nightly-ok": {"command": ["true"], "every": "1h"},
                           "nightly-broken": {"command": ["false"], "every": "1h"}}
    pair.config.write_text(yaml.safe_dump(config))
    assert pair.run("dbdeck", "schedule", "exec", "nightly-ok").returncode == 0
    assert pair.run("dbdeck", "schedule", "exec", "nightly-broken").returncode == 1
    textfiles = tmp_path / "textfile"
    textfiles.mkdir()
    written = pair.run("dbdeck", "status", "--format", "prometheus", "--output", textfiles / "dbdeck.prom")
    assert written.returncode == 1, written.stdout + written.stderr  # a failing job is a problem

    status_port, replication_port, exporter_port, prometheus_port = (free_port() for _ in range(4))
    rules = sorted(str(path) for path in (BIN.parent / "etc" / "prometheus").glob("*.yml")
                   if not path.name.endswith(".test.yml"))
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": rules,
        "scrape_configs": [
            {"job_name": "dbdeck-status", "static_configs": [{"targets": [f"127.0.0.1:{status_port}"]}]},
            {"job_name": "dbdeck-replication", "static_configs": [{"targets": [f"127.0.0.1:{replication_port}"]}]},
            {"job_name": "node", "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}]}]}))
    checked = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                             text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("status", "replication", "exporter", "prometheus")}
    processes = [
        subprocess.Popen([str(BIN / "dbdeck"), "--config", str(pair.config), "status", "--serve", f":{status_port}"],
                         stdout=subprocess.DEVNULL, stderr=logs["status"]),
        subprocess.Popen([str(BIN / "check-replication"), "--config", str(pair.config), "--serve",
                          f":{replication_port}"], stdout=subprocess.DEVNULL, stderr=logs["replication"]),
        subprocess.Popen(["prometheus-node-exporter", "--collector.disable-defaults", "--collector.textfile",
                          f"--collector.textfile.directory={textfiles}",
                          f"--web.listen-address=127.0.0.1:{exporter_port}"],
                         stdout=subprocess.DEVNULL, stderr=logs["exporter"]),
        subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                          f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                          f"--web.listen-address=127.0.0.1:{prometheus_port}"],
                         stdout=subprocess.DEVNULL, stderr=logs["prometheus"])]
    try:
        def targets_up():
            return sorted((r["metric"]["job"], r["value"][1]) for r in _safe_query(prometheus_port, "up"))

        assert wait_for(lambda: targets_up() == [("dbdeck-replication", "1"), ("dbdeck-status", "1"), ("node", "1")],
                        timeout=60), (targets_up(), (tmp_path / "prometheus.log").read_text()[-2000:])
        documented = (_documented_metrics("Metrics (prefixed `dbdeck_`", "`history` lists")
                      | _documented_metrics("- Metrics: `--format prometheus` prints", "- `setup-master"))
        # what this host lacks: no service ran here, no sync or deploy recorded a result, and a stock
        # max_slot_wal_keep_size (-1) leaves a slot's safe_wal_size NULL; dbdeck_job is the label itself
        absent_here = {"dbdeck_service_up", "dbdeck_result_last_success_timestamp_seconds",
                       "dbdeck_result_last_duration_seconds", "pg_replication_slot_safe_wal_size_bytes", "dbdeck_job"}
        expected = documented - absent_here
        assert len(expected) > 15, expected

        def missing():
            present = {r["metric"]["__name__"] for r in _safe_query(prometheus_port, '{__name__=~"(dbdeck|pg)_.+"}')}
            return sorted(expected - present)

        assert wait_for(lambda: not missing(), timeout=30), missing()
        for scrape_job in ("dbdeck-status", "node"):
            exits = _query(prometheus_port, f'dbdeck_job_last_exit_code{{job="{scrape_job}"}}')
            assert sorted((r["metric"].get("dbdeck_job"), r["value"][1]) for r in exits) == \
                [("nightly-broken", "1"), ("nightly-ok", "0")], exits
        everything = _query(prometheus_port, '{__name__=~"(dbdeck|pg)_.+"}')
        assert not [r["metric"] for r in everything if {"exported_job", "exported_instance"} & set(r["metric"])]

        def failing_alerts():
            return sorted((r["metric"].get("dbdeck_job"), r["metric"]["job"], r["metric"]["alertstate"])
                          for r in _safe_query(prometheus_port, 'ALERTS{alertname="DbdeckJobFailing"}'))

        assert wait_for(lambda: len(failing_alerts()) == 2, timeout=30), failing_alerts()
        assert {(name, scrape_job) for name, scrape_job, _ in failing_alerts()} == \
            {("nightly-broken", "dbdeck-status"), ("nightly-broken", "node")}, failing_alerts()
        assert {state for _, _, state in failing_alerts()} <= {"pending", "firing"}
        rules_api = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{prometheus_port}/api/v1/alerts",
                                                      timeout=5).read())
        summaries = {a["annotations"]["summary"] for a in rules_api["data"]["alerts"]
                     if a["labels"]["alertname"] == "DbdeckJobFailing"}
        assert summaries == {"dbdeck job nightly-broken failed (exit 1)"}, summaries
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(timeout=30) for process in processes]
        for log in logs.values():
            log.close()
    assert codes[:2] == [0, 0], [(tmp_path / f"{n}.log").read_text()[-1000:] for n in ("status", "replication")]
