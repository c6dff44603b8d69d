"""Barman's configuration as dbdeck renders it, and the restore's decisions (which backup, which time)."""

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from dbdeck import output
from dbdeck.config import ConfigError
from dbdeck.errors import Refused, UsageError
from dbdeck.plugins.replication import backup
from dbdeck.plugins.replication.barman import Barman
from dbdeck.plugins.replication.pgpass import pgpass_line
from dbdeck.plugins.replication.model import Backup, Replication
from dbdeck.run import Runner


def _pair(tmp_path, **backup_settings):
    settings = Replication(nodes={}, backup=Backup(home=tmp_path / "barman", os_user="root", **backup_settings))
    app = SimpleNamespace(config=SimpleNamespace(state_dir=tmp_path, where=lambda: "dbdeck.yaml"))
    return SimpleNamespace(settings=settings, runner=Runner(dry_run=False), app=app)


def _node(host="127.0.0.1", port=5432):
    return SimpleNamespace(name="alpha", replication_address=(host, port))


def test_rendered_configuration_streams_from_the_primary_without_the_password(tmp_path):
    barman = Barman(_pair(tmp_path, retention_policy="redundancy 3"))
    files = barman.render(_node("db.internal", 6543), "/usr/lib/postgresql/15/bin")
    server = files[tmp_path / "barman" / "barman.d" / "pair.conf"]
    assert "backup_method = postgres" in server and "streaming_archiver = on" in server
    assert "slot_name = barman" in server and "retention_policy = REDUNDANCY 3" in server
    assert "host=db.internal port=6543 user=replicator" in server
    assert f"passfile={tmp_path}/barman/pgpass" in server and "password" not in server.replace("passfile", "")
    assert "path_prefix = /usr/lib/postgresql/15/bin" in server
    main = files[tmp_path / "barman" / "barman.conf"]
    assert f"barman_home = {tmp_path}/barman/data" in main and "barman_user = root" in main


def test_a_percent_sign_cannot_reach_barmans_ini_parser(tmp_path):
    barman = Barman(_pair(tmp_path))
    barman.home = tmp_path / "50%"
    barman.config_file = barman.home / "barman.conf"
    barman.data = barman.home / "data"
    with pytest.raises(ConfigError, match="cannot go into Barman's configuration"):
        barman.render(_node(), "/usr/bin")


def test_pgpass_escapes_its_separators():
    assert pgpass_line("h", 5432, "replicator", "a:b\\c") == "h:5432:*:replicator:a\\:b\\\\c\n"


def test_settings_refuse_what_barman_would_misread(tmp_path):
    with pytest.raises(ValueError, match="RECOVERY WINDOW"):
        Backup(retention_policy="keep a week")
    with pytest.raises(ValueError, match="cron expression"):
        Backup(schedule="daily")
    with pytest.raises(ValueError, match="lower-case"):
        Backup(server="Pair; rm")


def test_an_unknown_os_user_is_a_config_error(tmp_path):
    pair = _pair(tmp_path)
    pair.settings.backup.os_user = "no-such-user-here"
    with pytest.raises(ConfigError, match="no OS user"):
        Barman(pair)


def test_backups_without_a_section_say_how_to_add_one(tmp_path):
    pair = _pair(tmp_path)
    pair.settings.backup = None
    with pytest.raises(ConfigError, match="replication.backup is not configured"):
        Barman(pair)


def _backups(*ends):
    return [{"backup_id": f"2026120{i}T000000", "status": "DONE",
             "end_time_timestamp": str(int(end.timestamp()))} for i, end in enumerate(ends, 1)]


def test_the_restore_takes_the_newest_backup_that_ended_before_the_target(tmp_path):
    now = datetime.now(timezone.utc)
    fake = SimpleNamespace(name="pair", backups=lambda: _backups(now - timedelta(days=2), now - timedelta(hours=1)))
    assert backup.choose_backup(fake, now - timedelta(hours=3))["backup_id"] == "20261201T000000"
    assert backup.choose_backup(fake, now)["backup_id"] == "20261202T000000"
    assert backup.choose_backup(fake, None)["backup_id"] == "20261202T000000"
    with pytest.raises(Refused, match="before the oldest restorable moment"):
        backup.choose_backup(fake, now - timedelta(days=3))


def test_target_times(tmp_path):
    assert backup.parse_target_time("2020-12-03T10:00:00+02:00").utcoffset() == timedelta(hours=2)
    assert backup.parse_target_time("2020-12-03 10:00:00").tzinfo is not None  # local time
    with pytest.raises(UsageError, match="ISO 8601"):
        backup.parse_target_time("yesterday")
    with pytest.raises(Refused, match="in the future"):
        backup.parse_target_time("2999-01-01T00:00:00+00:00")


def test_one_size_and_duration_format():
    assert output.human_bytes(512) == "512 B"
    assert output.human_bytes(16 * 1024) == "16.0 kB"
    assert output.human_bytes(3 * 1024**3 // 2) == "1.5 GB"
    assert output.human_bytes(None) == "?"
    assert output.human_duration(59) == "59s"
    assert output.human_duration(3 * 3600 + 300) == "3h 05m"
    assert output.human_duration(2 * 86400 + 4 * 3600) == "2d 04h"


@pytest.mark.parametrize("wall_clock, what", [("2026-03-29 01:30", "skipped"), ("2026-10-25 01:30", "showed twice")])
def test_a_local_time_in_a_daylight_saving_change_is_refused_not_guessed(monkeypatch, wall_clock, what):
    import time

    from dbdeck.errors import UsageError
    from dbdeck.plugins.replication.backup import parse_target_time

    monkeypatch.setenv("TZ", "Europe/Lisbon")
    time.tzset()
    try:
        with pytest.raises(UsageError, match=f"the local clock {what} that time"):
            parse_target_time(wall_clock)
        assert parse_target_time("2026-06-01 12:00").isoformat() == "2026-06-01T12:00:00+01:00"
    finally:
        monkeypatch.undo()
        time.tzset()
