import logging
import time

from dbdeck import log, secrets


def test_daily_file_named_like_the_seed_and_masked(tmp_path):
    secrets.register("log-secret-value")
    handler = log.add_daily_file(tmp_path, "sync")
    try:
        logging.getLogger("dbdeck.test").info("connecting with log-secret-value to postgresql://u:pw@h/db")
    finally:
        logging.getLogger("dbdeck").removeHandler(handler)
        handler.close()
    path = tmp_path / f"sync-{time.strftime('%Y%m%d')}.log"
    text = path.read_text()
    assert "log-secret-value" not in text and ":pw@" not in text and "***" in text
    assert path.stat().st_mode & 0o777 == 0o640


def test_daily_file_switches_with_the_date(tmp_path):
    handler = log.DailyFileHandler(tmp_path, "sync")
    handler.setFormatter(logging.Formatter("%(message)s"))
    for created, message in ((0, "first day"), (86400 * 2, "third day")):
        record = logging.LogRecord("dbdeck", logging.INFO, __file__, 1, message, None, None)
        record.created = created
        handler.emit(record)
    handler.close()
    assert sorted(p.read_text() for p in tmp_path.iterdir()) == ["first day\n", "third day\n"]
