"""A tenant's MySQL/MariaDB database: its tables, its sync state, and the three ways rows land there.

* full sync, swap: the rows load into `<table>__dbdeck_new` (LOAD DATA LOCAL streamed from the
  source's COPY, or multi-row REPLACE when local_infile is off), then one atomic
  ``RENAME TABLE t TO t__dbdeck_old, t__dbdeck_new TO t``: readers see the old table or the new one,
  the result equals the source query exactly, and nothing is merged row by row.
* full sync, merge (a table with triggers or foreign keys, which a rename would detach): rows load
  into a temporary stage, then in one transaction upsert + delete what the source no longer has.
* incremental: changed rows into the stage, then one transaction: upsert, delete removed keys,
  advance the watermark. The watermark commits with the rows or not at all.

Duplicate keys inside one load collapse (REPLACE: the last row wins), including the secondary
unique keys, so a batch never fails on them; a target row whose unique key an incoming row takes
(a phone moved to another contact) is deleted before the upsert instead of being overwritten.
VALUES() in ON DUPLICATE KEY UPDATE (deprecated in MySQL 8.0.20+) is never used: the upsert reads
from a derived table, which MySQL 5.5+ and MariaDB 10.0+ all accept.
"""

import contextlib
import logging
import os
import re
import tempfile
import threading

from dbdeck.errors import DbdeckError

log = logging.getLogger("dbdeck.local_sync")

STATE_TABLE = "dbdeck_local_sync_state"
STATE_DDL = f"""CREATE TABLE IF NOT EXISTS {STATE_TABLE} (
    table_name VARCHAR(64) NOT NULL,
    instance VARCHAR(255) NOT NULL,
    watermark VARCHAR(64) NULL,
    last_full_sync DATETIME NULL,
    last_sync DATETIME NULL,
    last_mode VARCHAR(16) NULL,
    last_rows INT NULL,
    PRIMARY KEY (table_name)
)"""
NEW_SUFFIX, OLD_SUFFIX = "__dbdeck_new", "__dbdeck_old"
ER_LOCK_WAIT_TIMEOUT = 1205
_FIFO_CHUNK = 1 << 20


def quote(identifier):
    """A MySQL identifier in backticks (a backtick inside is doubled)."""
    return "`" + str(identifier).replace("`", "``") + "`"


def column_list(columns):
    return ", ".join(quote(c) for c in columns)


class Tenant:
    def __init__(self, endpoint, settings, dry_run=False, say=None):
        self.endpoint = endpoint
        self.settings = settings
        self.dry_run = dry_run
        self.say = say or (lambda line: None)
        self.connection = None
        self.local_infile = False
        self.collapsed = 0
        self.written = 0  # rows the last merge inserted or changed
        self.max_statement_bytes = 1 << 20

    # --- connection ----------------------------------------------------------------------------------
    def open(self):
        self.connection = self.endpoint.connect(autocommit=False,
                                                driver_options={"local_infile": self.settings.method != "insert"})
        with self.errors("session set-up"):
            # strict: a value MySQL cannot store fails the batch instead of being truncated silently
            self.execute("SET SESSION sql_mode = 'STRICT_TRANS_TABLES,NO_ENGINE_SUBSTITUTION'")
            self.execute(f"SET SESSION lock_wait_timeout = {int(self.settings.lock_wait_seconds)}")
            # LOAD DATA LOCAL waits for rows while the source query may still be sorting or joining
            self.execute("SET SESSION net_read_timeout = 3600")
            infile, packet = self.query("SELECT @@local_infile, @@max_allowed_packet")[0]
        self.max_statement_bytes = int(packet) * 9 // 10
        self.local_infile = bool(int(infile)) and self.settings.method != "insert"
        if self.settings.method == "load_data" and not self.local_infile:
            raise DbdeckError(f"{self.endpoint.name}: method load_data needs local_infile=ON on the server "
                              f"(or method: auto/insert)")
        return self

    def close(self):
        if self.connection is not None:
            with contextlib.suppress(Exception):
                self.connection.close()
            self.connection = None

    @contextlib.contextmanager
    def errors(self, what):
        try:
            with self.endpoint.driver_errors(what):
                yield
        except DbdeckError:
            with contextlib.suppress(Exception):
                self.connection.rollback()
            raise

    def execute(self, statement, params=None):
        with self.connection.cursor() as cursor:
            return cursor.execute(statement, params)

    def query(self, statement, params=None):
        with self.connection.cursor() as cursor:
            cursor.execute(statement, params)
            return cursor.fetchall()

    def write(self, statement, params=None):
        """A statement that changes the tenant: printed in a dry run."""
        if self.dry_run:
            self.say(f"would execute on {self.endpoint.name}: {self._rendered(statement, params)}")
            return 0
        return self.execute(statement, params)

    def _rendered(self, statement, params):
        """The statement with its values, as the server would get it (the dry run shows the keys)."""
        if params is None or self.connection is None:
            return statement
        with self.connection.cursor() as cursor:
            return cursor.mogrify(statement, params)

    # --- tables --------------------------------------------------------------------------------------
    def table_exists(self, table):
        return bool(self.query("SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() "
                               "AND TABLE_NAME = %s", (table,)))

    def ensure_state_table(self):
        if not self.table_exists(STATE_TABLE):
            self.write(STATE_DDL)

    def ensure_table(self, mapping):
        """Create the table from its DDL when missing; check its primary key is the mapping's key."""
        with self.errors(f"table {mapping.name}"):
            if not self.table_exists(mapping.name):
                if not mapping.ddl:
                    raise DbdeckError(f"table {mapping.name} does not exist in {self.endpoint.name} and "
                                      f"local_sync.tables.{mapping.name}.ddl is not set")
                self.write(mapping.ddl)
                if self.dry_run:
                    return list(mapping.columns or [])
                if not self.table_exists(mapping.name):
                    raise DbdeckError(f"local_sync.tables.{mapping.name}.ddl did not create a table named "
                                      f"{mapping.name}")
            columns = self.columns(mapping.name)
            primary = [row[0] for row in self.query(
                "SELECT COLUMN_NAME FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE() "
                "AND TABLE_NAME = %s AND INDEX_NAME = 'PRIMARY' ORDER BY SEQ_IN_INDEX", (mapping.name,))]
        if sorted(primary) != sorted(mapping.key):
            raise DbdeckError(f"{self.endpoint.name}.{mapping.name}: primary key is ({', '.join(primary) or 'none'}) "
                              f"but the mapping's key is ({', '.join(mapping.key)})")
        wanted = mapping.columns or columns
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise DbdeckError(f"{self.endpoint.name}.{mapping.name} has no column(s) {', '.join(missing)}")
        return list(wanted)

    def columns(self, table):
        """The table's columns in order ([] when it does not exist)."""
        return [row[0] for row in self.query(
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() "
            "AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION", (table,))]

    def unique_keys(self, table):
        """Secondary unique keys: {index name: [columns]}."""
        keys = {}
        for index, column in self.query(
                "SELECT INDEX_NAME, COLUMN_NAME FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE() "
                "AND TABLE_NAME = %s AND NON_UNIQUE = 0 AND INDEX_NAME <> 'PRIMARY' ORDER BY INDEX_NAME, SEQ_IN_INDEX",
                (table,)):
            keys.setdefault(index, []).append(column)
        return keys

    def swap_blockers(self, table):
        """Why an atomic rename would be wrong for this table (triggers, foreign keys), or []."""
        blockers = [f"trigger {row[0]}" for row in self.query(
            "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS WHERE EVENT_OBJECT_SCHEMA = DATABASE() "
            "AND EVENT_OBJECT_TABLE = %s", (table,))]
        blockers += [f"foreign key {row[0]}" for row in self.query(
            "SELECT CONSTRAINT_NAME FROM information_schema.KEY_COLUMN_USAGE WHERE TABLE_SCHEMA = DATABASE() "
            "AND REFERENCED_TABLE_NAME IS NOT NULL AND (TABLE_NAME = %s OR REFERENCED_TABLE_NAME = %s)",
            (table, table))]
        return blockers

    def drop_leftovers(self, table):
        """Tables a killed run left behind (the new copy it was loading, the old one it was dropping)."""
        for suffix in (NEW_SUFFIX, OLD_SUFFIX):
            if self.table_exists(table + suffix):
                self.write(f"DROP TABLE {quote(table + suffix)}")

    # --- state ---------------------------------------------------------------------------------------
    def state(self):
        """{table: row dict} from the state table ({} when it does not exist yet)."""
        if not self.table_exists(STATE_TABLE):
            return {}
        with self.connection.cursor() as cursor:
            cursor.execute(f"SELECT table_name, instance, watermark, last_full_sync, last_sync, last_mode, last_rows "
                           f"FROM {STATE_TABLE}")
            names = [d[0] for d in cursor.description]
            return {row[0]: dict(zip(names, row)) for row in cursor.fetchall()}

    def record(self, table, instance, watermark, mode, rows):
        if self.dry_run:
            self.say(f"would record in {self.endpoint.name}.{STATE_TABLE}: {table} {mode} sync, watermark {watermark}")
            return
        full = ", last_full_sync = UTC_TIMESTAMP()" if mode == "full" else ""
        self.write(f"INSERT INTO {STATE_TABLE} (table_name, instance, watermark, last_full_sync, last_sync, last_mode, "
                   f"last_rows) VALUES (%s, %s, %s, {'UTC_TIMESTAMP()' if mode == 'full' else 'NULL'}, "
                   f"UTC_TIMESTAMP(), %s, %s) ON DUPLICATE KEY UPDATE instance = %s, watermark = %s, "
                   f"last_sync = UTC_TIMESTAMP(), last_mode = %s, last_rows = %s{full}",
                   (table, instance, watermark, mode, rows, instance, watermark, mode, rows))

    def row_count(self, table):
        return int(self.query(f"SELECT COUNT(*) FROM {quote(table)}")[0][0])

    # --- loading -------------------------------------------------------------------------------------
    def load(self, table, columns, source, connection, query):
        """Stream the query's rows into `table` (REPLACE: duplicates collapse, last wins); return the row count.

        `collapsed` counts the rows a later row with the same key (primary or unique) replaced.
        """
        self.collapsed = 0
        if self.dry_run:
            count = source.count(connection, query)
            self.say(f"would load {count} row(s) into {self.endpoint.name}.{table} "
                     f"({'LOAD DATA LOCAL' if self.local_infile else 'multi-row REPLACE'})")
            return count
        if self.local_infile:
            return self._load_data(table, columns, source.copy_csv(connection, query))
        return self.insert_rows(table, columns, source.fetch(connection, query, self.settings.insert_batch_rows))

    def insert_rows(self, table, columns, batches):
        """Multi-row REPLACE, batch by batch (the path when local_infile is off); return the row count."""
        head = f"REPLACE INTO {quote(table)} ({column_list(columns)}) VALUES "
        row_marks = "(" + ", ".join(["%s"] * len(columns)) + ")"
        count = 0
        with self.errors(f"insert into {table}"), self.connection.cursor() as cursor:
            pending = [list(rows) for rows in batches]
            while pending:
                rows = pending.pop(0)
                statement = cursor.mogrify(head + ", ".join([row_marks] * len(rows)),
                                           [value for row in rows for value in row])
                if len(statement) > self.max_statement_bytes and len(rows) > 1:
                    # wide rows: halve the batch until it fits the server's max_allowed_packet
                    pending[:0] = [rows[:len(rows) // 2], rows[len(rows) // 2:]]
                    continue
                affected = cursor.execute(statement)
                count += len(rows)
                self.collapsed += max(0, affected - len(rows))  # REPLACE counts a replaced row twice
        return count

    def _load_data(self, table, columns, chunks):
        """LOAD DATA LOCAL INFILE from a named pipe fed by the source's COPY: no file, constant memory."""
        with tempfile.TemporaryDirectory(prefix="dbdeck-local-sync-") as directory:
            fifo = os.path.join(directory, "rows.csv")
            os.mkfifo(fifo, 0o600)
            feeder = _Feeder(fifo, chunks)
            feeder.start()
            statement = (f"LOAD DATA LOCAL INFILE %s REPLACE INTO TABLE {quote(table)} CHARACTER SET utf8mb4 "
                         f"FIELDS TERMINATED BY ',' OPTIONALLY ENCLOSED BY '\"' ESCAPED BY '' "
                         f"LINES TERMINATED BY '\\n' ({column_list(columns)})")
            try:
                with self.errors(f"LOAD DATA into {table}"), self.connection.cursor() as cursor:
                    cursor.execute(statement, (fifo,))
                    # "Records: 3  Deleted: 1  Skipped: 0  Warnings: 0": Deleted = rows replaced by a later one
                    found = re.search(rb"Deleted:\s*(\d+)", getattr(cursor._result, "message", b"") or b"")
                    self.collapsed += int(found.group(1)) if found else 0
            finally:
                feeder.finish()
            if feeder.error is not None:
                self.connection.rollback()
                raise feeder.error
        problems = [row for row in self.query("SHOW WARNINGS") if row[0] != "Note"]
        if problems:
            self.connection.rollback()
            shown = "; ".join(f"{level} {code}: {message}" for level, code, message in problems[:3])
            raise DbdeckError(f"LOAD DATA into {self.endpoint.name}.{table} reported {len(problems)} problem(s), "
                              f"nothing kept: {shown}")
        return feeder.rows

    # --- the three ways ------------------------------------------------------------------------------
    def full_swap(self, mapping, columns, source, connection, query):
        """Load a new copy and rename it in; return (rows, rows removed, "swap" or "merge").

        When a session of the tenant's application keeps the table open longer than lock_wait_seconds
        (a long transaction holds its metadata lock, which RENAME must wait for and which would queue
        every other query behind it), the loaded copy is merged in with row locks instead.
        """
        table = mapping.name
        new, old = table + NEW_SUFFIX, table + OLD_SUFFIX
        with self.errors(f"full sync of {table}"):
            self.drop_leftovers(table)
            self.write(f"CREATE TABLE {quote(new)} LIKE {quote(table)}")
            try:
                rows = self.load(new, columns, source, connection, query)
                if not self.dry_run:
                    self.connection.commit()
                swapped = self._rename_in(table, new, old)
            except BaseException:
                with contextlib.suppress(Exception):
                    self.connection.rollback()
                    self.write(f"DROP TABLE IF EXISTS {quote(new)}")
                raise
            if swapped:
                removed = self._rows_only_in(old, table, mapping.key)
                self.write(f"DROP TABLE {quote(old)}")
                return rows, removed, "swap"
            removed = self.merge(mapping, columns, new, delete_missing=True)
            self.connection.commit()
            self.write(f"DROP TABLE {quote(new)}")
        return rows, removed, "merge"

    def _rename_in(self, table, new, old):
        import pymysql

        try:
            self.write(f"RENAME TABLE {quote(table)} TO {quote(old)}, {quote(new)} TO {quote(table)}")
            return True
        except pymysql.err.OperationalError as exc:
            if exc.args[0] != ER_LOCK_WAIT_TIMEOUT:
                raise
            log.warning("%s.%s: another session kept the table open for %ss; merging the new rows in instead of "
                        "renaming", self.endpoint.name, table, self.settings.lock_wait_seconds)
            return False

    def _rows_new_or_changed(self, stage, table, key, columns):
        joined = " AND ".join(f"t.{quote(k)} = s.{quote(k)}" for k in key)
        same = " AND ".join(f"t.{quote(c)} <=> s.{quote(c)}" for c in columns)
        return int(self.query(f"SELECT count(*) AS n FROM {quote(stage)} s LEFT JOIN {table} t ON {joined} "
                              f"WHERE t.{quote(key[0])} IS NULL OR NOT ({same})")[0][0])

    def _rows_only_in(self, old, new, key):
        """Rows a full load removed: in the copy renamed away, not in the new one."""
        if self.dry_run:
            return 0
        joined = " AND ".join(f"n.{quote(k)} = o.{quote(k)}" for k in key)
        return int(self.query(f"SELECT count(*) AS n FROM {quote(old)} o LEFT JOIN {quote(new)} n ON {joined} "
                              f"WHERE n.{quote(key[0])} IS NULL")[0][0])

    def stage(self, mapping):
        stage = f"dbdeck_stage_{mapping.name}"[:64]
        self.write(f"DROP TEMPORARY TABLE IF EXISTS {quote(stage)}")
        self.write(f"CREATE TEMPORARY TABLE {quote(stage)} LIKE {quote(mapping.name)}")
        return stage

    def merge(self, mapping, columns, stage, delete_missing=False, delete_keys=()):
        """Apply the stage to the table (one transaction, committed by the caller); return rows removed."""
        table, key = quote(mapping.name), mapping.key
        removed = 0
        for chunk_start in range(0, len(delete_keys), 1000):
            chunk = delete_keys[chunk_start:chunk_start + 1000]
            condition = " OR ".join("(" + " AND ".join(f"{quote(k)} = %s" for k in key) + ")" for _ in chunk)
            removed += self.write(f"DELETE FROM {table} WHERE {condition}",
                                  [row[k] for row in chunk for k in key]) or 0
        for unique in self.unique_keys(mapping.name).values():
            taken = " AND ".join(f"t.{quote(c)} = s.{quote(c)}" for c in unique)
            other = " OR ".join(f"NOT (t.{quote(k)} <=> s.{quote(k)})" for k in key)
            self.write(f"DELETE t FROM {table} t JOIN {quote(stage)} s ON {taken} WHERE {other}")
        self.written = 0 if self.dry_run else self._rows_new_or_changed(stage, table, key, columns)
        non_key = [c for c in columns if c not in key] or key[:1]
        updates = ", ".join(f"{quote(c)} = src.{quote(c)}" for c in non_key)
        self.write(f"INSERT INTO {table} ({column_list(columns)}) SELECT * FROM (SELECT {column_list(columns)} "
                   f"FROM {quote(stage)}) AS src ON DUPLICATE KEY UPDATE {updates}")
        if delete_missing:
            joined = " AND ".join(f"s.{quote(k)} = t.{quote(k)}" for k in key)
            removed += self.write(f"DELETE t FROM {table} t LEFT JOIN {quote(stage)} s ON {joined} "
                                  f"WHERE s.{quote(key[0])} IS NULL") or 0
        self.write(f"DROP TEMPORARY TABLE IF EXISTS {quote(stage)}")
        return removed


class _Feeder(threading.Thread):
    """Writes the COPY chunks into the named pipe that LOAD DATA LOCAL reads."""

    def __init__(self, fifo, chunks):
        super().__init__(name="local-sync-feeder", daemon=True)
        self.fifo = fifo
        self.chunks = chunks
        self.rows = 0
        self.error = None
        self._halt = threading.Event()

    def run(self):
        fd = self._open()
        if fd is None:
            return
        try:
            buffer, size = [], 0
            for chunk in self.chunks:
                if self._halt.is_set():
                    return
                buffer.append(chunk)
                size += len(chunk)
                self.rows += 1
                if size >= _FIFO_CHUNK:
                    _write_all(fd, b"".join(buffer))
                    buffer, size = [], 0
            _write_all(fd, b"".join(buffer))
        except BrokenPipeError:
            pass  # the reader gave up; its own error says why
        except Exception as exc:  # reported by the loading thread
            self.error = exc if isinstance(exc, DbdeckError) else DbdeckError(f"reading the source failed: {exc}")
        finally:
            os.close(fd)
            with contextlib.suppress(Exception):
                self.chunks.close()

    def _open(self):
        # non-blocking until the reader has opened its end: a LOAD that failed before reading
        # must not leave this thread blocked in open() forever
        while not self._halt.is_set():
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                self._halt.wait(0.01)
                continue
            os.set_blocking(fd, True)
            return fd
        return None

    def finish(self):
        self._halt.set()
        self.join(timeout=30)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
