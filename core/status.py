"""`dbdeck status`: everything dbdeck runs on this host in one view (text table, JSON, Prometheus).

Plugins contribute rows through the status_report hook (the schedule plugin its jobs, the replication
plugin its verdict and the auto-failover service...). Commands that finish a piece of work (a sync, a
deploy, a backup) call App.record_result(), and those results appear here without a hook of their own.
"""

from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from . import output
from .errors import DbdeckError
from .state import StateFile

RESULTS_FILE = "results.json"
PROBLEMS = ("failing", "stale", "dead", "down")

METRIC_HELP = {
    "dbdeck_job_last_success_timestamp_seconds": "Unix time the job last exited 0",
    "dbdeck_job_last_duration_seconds": "How long the job's last finished run took",
    "dbdeck_job_last_exit_code": "Exit code of the job's last finished run (75: skipped, its previous run held "
                                 "the lock)",
    "dbdeck_job_running": "1 while a run of the job is going",
    "dbdeck_job_interval_seconds": "Time between two scheduled runs of the job (for staleness alerts)",
    "dbdeck_service_up": "1 while the long-running dbdeck service holds its lock (is alive)",
    "dbdeck_result_last_success_timestamp_seconds": "Unix time the command last finished its work",
    "dbdeck_result_last_duration_seconds": "How long the command's last finished work took",
    "dbdeck_backup_last_success_timestamp_seconds": "Unix time the last base backup of the pair ended (Barman)",
    "dbdeck_backup_last_verified_timestamp_seconds": "Unix time a restore of the backups last passed `pitr verify`",
    "dbdeck_backup_wal_chain_complete": "0 from a failover until a base backup of the new primary exists",
    "dbdeck_backup_wal_streaming": "1 when Barman's WAL receiver streamed from the primary at its last check",
    "dbdeck_status_problems": "Rows of `dbdeck status` that are failing, stale, dead or down",
}


@dataclass
class Item:
    """One row of `dbdeck status`."""

    kind: str                  # job, service, replication, sync, deploy, backup...
    name: str
    state: str                 # ok, running, never, disabled, stopped | failing, stale, dead, down
    detail: str = ""
    last: str | None = None    # when it last ran / started (ISO 8601)
    next: str | None = None    # next scheduled run (ISO 8601), for jobs
    labels: dict = field(default_factory=dict)   # Prometheus labels, e.g. {"dbdeck_job": "sync-prod-to-dev"}
    metrics: dict = field(default_factory=dict)  # metric name -> value (see METRIC_HELP)
    data: dict = field(default_factory=dict)     # anything else, for --format json

    @property
    def problem(self):
        return self.state in PROBLEMS

    def as_dict(self):
        out = asdict(self)
        out["problem"] = self.problem
        return out


def epoch(iso):
    """ISO 8601 (as dbdeck writes it) -> Unix time, or None."""
    if not iso:
        return None
    try:
        return datetime.fromisoformat(str(iso)).timestamp()
    except ValueError:
        return None


def iso(ts):
    return output.timestamp(ts) if ts is not None else None


def results_file(config):
    return results_file_in(config.state_dir)


def results_file_in(state_dir):
    return StateFile(Path(state_dir) / RESULTS_FILE)


def record_result(config, name, kind, ok, summary, seconds=None, **details):
    """Remember how a command's work last ended (called by the command itself, never in a dry run)."""
    record_result_in(config.state_dir, name, kind, ok, summary, seconds, **details)


def record_result_in(state_dir, name, kind, ok, summary, seconds=None, **details):
    now = output.timestamp()
    fields = dict(kind=kind, at=now, ok=bool(ok), summary=summary, seconds=seconds, details=details)
    if ok:
        fields["last_success"] = now
    results_file_in(state_dir).update(name, **fields)


def result_items(config):
    items = []
    for name, result in sorted(results_file(config).read().items()):
        if not isinstance(result, dict):
            continue
        ok = result.get("ok")
        metrics = {"dbdeck_result_last_success_timestamp_seconds": epoch(result.get("last_success"))}
        if result.get("seconds") is not None:
            metrics["dbdeck_result_last_duration_seconds"] = result["seconds"]
        items.append(Item(kind=result.get("kind", "result"), name=name, state="ok" if ok else "failing",
                          detail=result.get("summary", ""), last=result.get("at"), labels={"command": name},
                          metrics={k: v for k, v in metrics.items() if v is not None},
                          data={"seconds": result.get("seconds"), "last_success": result.get("last_success"),
                                **(result.get("details") or {})}))
    return items


def service_items(app, lock_prefix):
    """One row per lock file named <lock_prefix>*.lock: a long-running service that has run on this host.
    Its lock says whether it is alive (the kernel drops a flock when the process dies, so no stale pid)."""
    from .lock import JobLock

    run_dir = JobLock("probe", app.config.core.run_dir).run_dir
    items = []
    for path in sorted(run_dir.glob(f"{lock_prefix}*.lock")):
        name = path.name[:-len(".lock")]
        state, holder = JobLock(name, run_dir).state()
        if state == "running":
            row = ("up", f"pid {holder.get('pid')}", holder.get("started"))
        elif state == "dead":
            row = ("dead", f"pid {holder.get('pid')} ended without stopping cleanly (killed or crashed)",
                   holder.get("started"))
        else:
            row = ("stopped", "stopped cleanly", None)
        items.append(Item(kind="service", name=name, state=row[0], detail=row[1], last=row[2],
                          labels={"service": name}, metrics={"dbdeck_service_up": 1 if state == "running" else 0},
                          data={"pid": (holder or {}).get("pid")}))
    return items


def collect(app):
    """Every row: plugins' (status_report hook) then recorded results. A plugin whose hook raises is one
    failing row naming it; the other plugins' rows still come."""
    before = len(app.hook_failures)
    contributed = app.guarded_hook("status_report", app=app)
    items = [item for _, rows in contributed for item in rows or ()]
    items.extend(Item(kind="plugin", name=failure.plugin, state="failing", detail=failure.message)
                 for failure in app.hook_failures[before:] if failure.hook == "status_report")
    del app.hook_failures[before:]  # they are rows now (and `status --serve` collects on every scrape)
    items.extend(result_items(app.config))
    return items


# --- renderings -------------------------------------------------------------------------------------
def render_text(items, width=None):
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    if not items:
        return "nothing to report: no jobs, services or results on this host yet"
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("KIND", "NAME", "STATE", "LAST", "NEXT", "DETAIL"):
        table.add_column(column, overflow="fold")
    styles = {"ok": "green", "running": "cyan"}
    for item in items:
        state = item.state.upper() if item.problem else item.state
        style = "bold red" if item.problem else styles.get(item.state, "")
        table.add_row(item.kind, item.name, f"[{style}]{state}[/]" if style else state,
                      _short_time(item.last), _short_time(item.next), item.detail)
    buffer = StringIO()
    Console(file=buffer, width=width or 200, highlight=False, force_terminal=False,
            no_color=True).print(table)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())


def _short_time(value):
    return value.replace("T", " ")[:16] if value else "-"


class MetricsCollector:
    """A prometheus_client collector that reads the status afresh on every scrape."""

    def __init__(self, gather):
        self.gather = gather

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        items = self.gather()
        families: dict[str, Any] = {}
        for item in items:
            labels = {_OWN_LABEL.get(key, key): value for key, value in item.labels.items()}
            for name, value in item.metrics.items():
                if value is None:
                    continue
                family = families.get(name)
                if family is None:
                    family = families[name] = GaugeMetricFamily(name, METRIC_HELP.get(name, name),
                                                                labels=list(labels))
                family.add_metric([str(v) for v in labels.values()], float(value))
        problems = GaugeMetricFamily("dbdeck_status_problems", METRIC_HELP["dbdeck_status_problems"])
        problems.add_metric([], sum(1 for i in items if i.problem))
        yield from families.values()
        yield problems


# Prometheus owns these two labels (the scrape job and target) and renames a scraped one to exported_job /
# exported_instance, so alerts would name the scrape job: a plugin's label of that name gets dbdeck_ in front
_OWN_LABEL = {"job": "dbdeck_job", "instance": "dbdeck_instance"}


def render_prometheus(gather):
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(MetricsCollector(gather))
    return generate_latest(registry).decode()


def serve_prometheus(gather, address, stop, ready=None):
    """Serve /metrics on address ([HOST]:PORT) until stop (a threading.Event) is set; ready(host, port) is
    called once it listens."""
    from prometheus_client import CollectorRegistry

    from .httpserve import parse_address, serve_metrics

    registry = CollectorRegistry()
    registry.register(MetricsCollector(gather))
    try:
        server = serve_metrics(registry, parse_address(address), name="status metrics")
    except OSError as exc:
        raise DbdeckError(f"cannot serve metrics on {address}: {exc.strerror}") from None
    if ready is not None:
        ready(*server.server_address[:2])
    try:
        stop.wait()
    finally:
        server.stop()
