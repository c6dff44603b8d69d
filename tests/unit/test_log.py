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


def test_run_files_are_one_per_run_masked_and_private(tmp_path):
    import logging
    import stat

    from dbdeck import secrets
    from dbdeck.log import add_run_file

    secrets.register("run-file-secret-xyz")
    logger = logging.getLogger("dbdeck")
    first, second = add_run_file(tmp_path, "failover"), add_run_file(tmp_path, "failover")
    try:
        logger.info("promoting with password run-file-secret-xyz")
    finally:
        for handler in (first, second):
            logger.removeHandler(handler)
            handler.close()
    assert first.path != second.path and first.path.name.startswith("failover-")
    for handler in (first, second):
        text = handler.path.read_text()
        assert "promoting with password ***" in text and "run-file-secret-xyz" not in text
        assert stat.S_IMODE(handler.path.stat().st_mode) == 0o640


def test_one_time_format_in_files_outputs_and_daemon_lines(tmp_path):
    import io
    import logging
    from datetime import datetime

    from dbdeck import log as log_module
    from dbdeck import output

    stamp = output.timestamp(0)
    assert datetime.fromisoformat(stamp).timestamp() == 0 and datetime.fromisoformat(stamp).tzinfo is not None
    handler = log_module.add_daily_file(tmp_path, "fmt")
    try:
        logging.getLogger("dbdeck.test").warning("hello")
    finally:
        logging.getLogger("dbdeck").removeHandler(handler)
        handler.close()
    line = next(tmp_path.glob("fmt-*.log")).read_text().splitlines()[-1]
    assert datetime.fromisoformat(line[1:line.index("]")]).tzinfo is not None, line
    sink = io.StringIO()
    lines = output.TimestampedLines(sink)
    lines.write("first\nsecond ")
    lines.write("half\n")
    written = sink.getvalue().splitlines()
    assert [w.split(" ", 1)[1] for w in written] == ["first", "second half"]
    assert all(datetime.fromisoformat(w.split(" ", 1)[0]).tzinfo is not None for w in written)


def test_timestamped_lines_take_bytes_too():
    import io

    from dbdeck import output

    sink = io.StringIO()
    lines = output.TimestampedLines(sink)
    lines.write(b"raw bytes\n")
    lines.write(b"")
    assert sink.getvalue().endswith(" raw bytes\n")
