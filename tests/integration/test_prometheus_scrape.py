"""What dbdeck serves for Prometheus, scraped by a real Prometheus (Debian's prometheus package): the
guarded /metrics server of `dbdeck status --serve` speaks what Prometheus reads."""

import json
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
