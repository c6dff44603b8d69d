import json
import time

import pytest
from click.testing import CliRunner

from dbdeck.cli import App, build_cli
from dbdeck.events import Event
from dbdeck.status import Item, render_prometheus, render_text


def config_file(tmp_path):
    path = tmp_path / "dbdeck.yaml"
    path.write_text(f"dbdeck:\n  state_dir: {tmp_path}/state\n  run_dir: {tmp_path}/run\n")
    return path


def invoke(*args):
    return CliRunner().invoke(build_cli(), [str(a) for a in args])


def test_every_notified_event_lands_in_history_in_time_order(tmp_path):
    app = App()
    app.config_path = str(config_file(tmp_path))
    app.notify(Event("switchover.done", "switchover: beta primary, alpha standby", at=time.time() - 7200))
    app.notify(Event("failover.promoted", "beta promoted to primary", severity="warning"))
    app.notify(Event("deploy.succeeded", "production: v2 deployed", details={"password": "hunter2"}))
    journal = tmp_path / "state" / "history.jsonl"
    with journal.open("a") as out:
        out.write('{"cut short by a full disk')  # a damaged line does not hide the others
    everything = json.loads(invoke("--config", app.config_path, "--format", "json", "history").output)
    assert [e["kind"] for e in everything] == ["switchover.done", "failover.promoted", "deploy.succeeded"]
    assert "hunter2" not in journal.read_text()
    recent = invoke("--config", app.config_path, "history", "--since", "1h", "--kind", "failover")
    assert recent.exit_code == 0 and "failover.promoted" in recent.output and "deploy" not in recent.output


def test_history_bad_since_is_a_one_line_usage_error(tmp_path):
    done = invoke("--config", config_file(tmp_path), "history", "--since", "last tuesday")
    assert done.exit_code == 2 and "give a duration like 90m, 12h, 7d" in done.output


def test_a_dry_run_writes_no_history(tmp_path):
    app = App()
    app.config_path = str(config_file(tmp_path))
    app.dry_run = True
    app.notify(Event("failover.promoted", "x"))
    assert not (tmp_path / "state" / "history.jsonl").exists()


ROWS = [Item("job", "sync-prod-to-dev", "ok", "exit 0 in 0.2s", last="2026-12-02T10:00:00+0000",
             next="2026-12-02T10:05:00+0000", labels={"dbdeck_job": "sync-prod-to-dev"},
             metrics={"dbdeck_job_last_exit_code": 0, "dbdeck_job_running": 0}),
        Item("service", "auto-failover", "dead", "pid 4 ended", labels={"service": "auto-failover"},
             metrics={"dbdeck_service_up": 0})]


def test_text_is_a_table_with_headers_and_problems_stand_out():
    lines = render_text(ROWS).splitlines()
    assert lines[0].split() == ["KIND", "NAME", "STATE", "LAST", "NEXT", "DETAIL"]
    assert lines[1].split()[:3] == ["job", "sync-prod-to-dev", "ok"] and "2026-12-02 10:05" in lines[1]
    assert lines[2].split()[:3] == ["service", "auto-failover", "DEAD"]


def test_prometheus_exposition_parses_with_the_exporter_names():
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(render_prometheus(lambda: ROWS))}
    assert families["dbdeck_service_up"].samples[0].labels == {"service": "auto-failover"}
    assert families["dbdeck_job_last_exit_code"].samples[0].value == 0
    assert families["dbdeck_status_problems"].samples[0].value == 1


def test_no_exposed_label_is_one_prometheus_owns():
    """A scrape renames a target's own job/instance labels to exported_*: a plugin's gets dbdeck_ instead."""
    from prometheus_client.parser import text_string_to_metric_families

    rows = [Item("job", "x", "ok", labels={"job": "x", "instance": "acme"}, metrics={"dbdeck_job_running": 0})]
    families = {f.name: f for f in text_string_to_metric_families(render_prometheus(lambda: rows + ROWS))}
    labels = [set(sample.labels) for family in families.values() for sample in family.samples]
    assert {"dbdeck_job", "dbdeck_instance"} in labels and not any(s & {"job", "instance"} for s in labels)


@pytest.mark.parametrize("fmt", ["json", "prometheus", "text"])
def test_status_on_an_empty_host_says_so_in_every_format(tmp_path, fmt):
    done = invoke("--config", config_file(tmp_path), "status", "--format", fmt)
    assert done.exit_code == 0, done.output
    if fmt == "json":
        assert json.loads(done.output) == []
    elif fmt == "text":
        assert "nothing to report" in done.output
    else:
        assert "dbdeck_status_problems 0.0" in done.output
