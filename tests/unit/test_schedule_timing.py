import subprocess

import pytest

from dbdeck.plugins.schedule.model import Job, parse_every
from dbdeck.errors import ConfigError
from dbdeck.plugins.schedule.timing import cron_expression, on_calendar


@pytest.mark.parametrize("every, seconds", [("30s", 30), ("5m", 300), ("6h", 21600), ("1d", 86400), (90, 90),
                                            ("0.25s", 0.25), ("2 minutes", 120)])
def test_parse_every(every, seconds):
    assert parse_every(every) == seconds


@pytest.mark.parametrize("bad", ["5x", "-1m", "0s", "soon", ""])
def test_parse_every_rejects(bad):
    with pytest.raises(ValueError):
        parse_every(bad)


@pytest.mark.parametrize("every, cron", [("1m", "* * * * *"), ("5m", "*/5 * * * *"), ("1h", "0 * * * *"),
                                         ("6h", "0 */6 * * *"), ("1d", "0 0 * * *")])
def test_every_to_cron(every, cron):
    assert cron_expression("j", Job(command=["x"], every=every)) == cron


@pytest.mark.parametrize("every", ["30s", "7m", "5h", "2d"])
def test_every_cron_cannot_express(every):
    with pytest.raises(ConfigError):
        cron_expression("j", Job(command=["x"], every=every))


def test_on_calendar_cannot_go_to_cron():
    with pytest.raises(ConfigError, match="systemd-only"):
        cron_expression("j", Job(command=["x"], on_calendar="daily"))


@pytest.mark.parametrize("job, expected_next_pattern", [
    (dict(every="5m"), "*-*-* *:00/5:00"), (dict(every="15s"), "*-*-* *:*:00/15"),
    (dict(every="6h"), "*-*-* 00/6:00:00"), (dict(every="1d"), "*-*-* 00:00:00"),
    (dict(cron="30 2 * * 1-5"), "Mon..Fri *-*-* 02:30:00"), (dict(cron="0 */6 1 * *"), "*-*-01 00,06,12,18:00:00"),
])
def test_on_calendar_is_accepted_by_systemd(job, expected_next_pattern):
    expression = on_calendar("j", Job(command=["x"], **job))
    done = subprocess.run(["systemd-analyze", "calendar", expression], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert expected_next_pattern in done.stdout


def test_day_of_month_and_week_together_is_refused_for_systemd():
    with pytest.raises(ConfigError, match="ORs and systemd ANDs"):
        on_calendar("j", Job(command=["x"], cron="0 0 1 * 1"))


@pytest.mark.parametrize("spec, message", [
    (dict(command=["x"]), "exactly one of every, cron or on_calendar"),
    (dict(command=["x"], every="5m", cron="* * * * *"), "got every, cron"),
    (dict(command=["x"], cron="61 * * * *"), "not a valid five-field cron"),
    (dict(command=["x"], cron="* * * *"), "not a valid five-field cron"),
    (dict(command=[], every="5m"), "command must not be empty"),
])
def test_job_validation(spec, message):
    with pytest.raises(ValueError, match=message):
        Job(**spec)


def test_foreground_signal_during_a_launch_is_acted_on_after_it(caplog, monkeypatch):
    """A SIGTERM that lands while a job is being spawned must not be followed by a "started" line:
    the run it interrupted is counted among those the scheduler waits for."""
    import logging
    import signal
    from types import SimpleNamespace

    from dbdeck.plugins.schedule import foreground

    monkeypatch.setattr(foreground, "dbdeck_argv", lambda app, *args: ["dbdeck", *args])
    scheduler = None

    class Process:
        pid = 4242

        def poll(self):
            return None

    def start_daemon(argv):
        scheduler._on_signal(signal.SIGTERM, None)  # the signal arrives mid-spawn
        return Process()

    scheduler = foreground.ForegroundScheduler(SimpleNamespace(runner=SimpleNamespace(start_daemon=start_daemon)),
                                               jobs={})
    with caplog.at_level(logging.INFO, logger="dbdeck.schedule"):
        scheduler.launch("slow")
        scheduler.act_on_signals()
        scheduler.launch("other")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "job slow: started (pid 4242)"
    assert lines[1].startswith("received SIGTERM: no new runs; waiting for 1 running job(s)")
    assert len(lines) == 2 and "other" not in scheduler.running
