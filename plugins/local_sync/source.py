"""The main PostgreSQL database: source queries wrapped, streamed, and their watermarks.

Everything one instance needs is read in one REPEATABLE READ, READ ONLY transaction, so the
tenant's tables come from one consistent view (a sector never points at a contact the same run
did not see). The source query is the operator's SQL; dbdeck binds %(instance)s client-side and
wraps the result: ``SELECT <converted target columns> FROM (<query>) AS q WHERE ...``.

Watermarks. A row's timestamp is set when its transaction writes it, but the row becomes visible
only at commit, possibly after a run already read past that timestamp. So the watermark stored
after a run is not the newest timestamp seen but the start of this run's snapshot, moved back to
the start of the oldest transaction still writing (when pg_stat_activity shows it), and the next
run re-reads `overlap_seconds` before it (for client-side clocks, as Prisma's @updatedAt uses).
Re-reading a row is harmless: the tenant's upsert is idempotent.
"""

import logging

from psycopg import ClientCursor, sql

from dbdeck.errors import ConfigError, DbdeckError

log = logging.getLogger("dbdeck.local_sync")

DELETES_TABLE = "dbdeck_local_sync_deletes"
NOTIFY_CHANNEL = "dbdeck_local_sync"

# PostgreSQL type OIDs that MySQL reads as they are printed; other types are sent as their text form
_PLAIN_TYPES = {20, 21, 23, 25, 700, 701, 1042, 1043, 1082, 1083, 1114, 1700}
_BOOL, _TIMESTAMPTZ, _DATE, _TIMESTAMP = 16, 1184, 1082, 1114
_WATERMARK_TYPES = {_TIMESTAMPTZ, _TIMESTAMP, _DATE}
_KEYS_PER_QUERY = 1000

WATERMARK_SQL = """
SELECT least(now(), (SELECT min(xact_start) FROM pg_stat_activity
                     WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid())) AS watermark,
       now() - make_interval(days => %(retention)s) AS capture_horizon
"""


class Source:
    def __init__(self, endpoint, settings):
        self.endpoint = endpoint
        self.settings = settings

    def connect(self):
        """A connection whose next transaction is one read-only snapshot, timestamps in UTC."""
        connection = self.endpoint.connect(autocommit=False)
        connection.isolation_level = 3  # psycopg.IsolationLevel.REPEATABLE_READ
        connection.read_only = True
        with self.endpoint.driver_errors("session set-up"):
            connection.execute("SET TIME ZONE 'UTC'")
            connection.commit()
        return connection

    # --- the wrapped query ------------------------------------------------------------------------
    def bound_query(self, connection, mapping, instance):
        """The source query with %(instance)s bound as a quoted literal (client-side, by psycopg)."""
        try:
            return ClientCursor(connection).mogrify(mapping.source_query, {"instance": instance})
        except Exception as exc:  # a stray % in the query
            raise ConfigError(f"local_sync.tables.{mapping.name}.source_query: cannot bind %(instance)s: {exc} "
                              f"(write a literal % as %%)") from None

    def shape(self, connection, mapping, instance, columns):
        """Check the query gives the target's columns (and the watermark); return {column: type oid}."""
        query = self.bound_query(connection, mapping, instance)
        with self.endpoint.driver_errors(f"source query of {mapping.name}"), connection.cursor() as cursor:
            cursor.execute(sql.Composed([sql.SQL("SELECT * FROM ("), sql.SQL(query), sql.SQL(") AS q LIMIT 0")]))
            types = {column.name: column.type_code for column in cursor.description}
        missing = [c for c in columns if c not in types]
        if missing:
            raise ConfigError(f"local_sync.tables.{mapping.name}.source_query gives no column(s) "
                              f"{', '.join(missing)} (it gives: {', '.join(types)})")
        if mapping.watermark:
            if mapping.watermark not in types:
                raise ConfigError(f"local_sync.tables.{mapping.name}: watermark column {mapping.watermark!r} "
                                  f"is not among the source query's columns ({', '.join(types)})")
            if types[mapping.watermark] not in _WATERMARK_TYPES:
                raise ConfigError(f"local_sync.tables.{mapping.name}: watermark column {mapping.watermark!r} "
                                  f"must be a timestamp or date")
        return types

    def select(self, connection, mapping, instance, columns, types, since=None, keys=None):
        """SELECT the target columns, converted for MySQL, changed since a watermark or for given keys."""
        q = sql.Identifier("q")
        items = []
        for column in columns:
            ref = sql.SQL("{}.{}").format(q, sql.Identifier(column))
            oid = types[column]
            if oid == _BOOL:
                ref = sql.SQL("({})::int").format(ref)
            elif oid == _TIMESTAMPTZ:
                ref = sql.SQL("({} AT TIME ZONE 'UTC')").format(ref)
            elif oid not in _PLAIN_TYPES:
                ref = sql.SQL("({})::text").format(ref)
            items.append(ref)
        parts = [sql.SQL("SELECT "), sql.SQL(", ").join(items), sql.SQL(" FROM ("),
                 sql.SQL(self.bound_query(connection, mapping, instance)), sql.SQL(") AS q")]
        if since is not None:
            parts.append(sql.SQL(" WHERE q.{} >= {}::timestamptz - make_interval(secs => {})").format(
                sql.Identifier(mapping.watermark), sql.Literal(since), sql.Literal(self.settings.overlap_seconds)))
        if keys is not None:
            key_columns = sql.SQL(", ").join(sql.SQL("q.{}").format(sql.Identifier(k)) for k in mapping.key)
            tuples = sql.SQL(", ").join(
                sql.SQL("({})").format(sql.SQL(", ").join(sql.Literal(key[k]) for k in mapping.key)) for key in keys)
            parts.append(sql.SQL(" WHERE ({}) IN ({})").format(key_columns, tuples))
        return sql.Composed(parts)

    def count(self, connection, query):
        with self.endpoint.driver_errors("count"), connection.cursor() as cursor:
            cursor.execute(sql.Composed([sql.SQL("SELECT count(*) FROM ("), query, sql.SQL(") AS counted")]))
            return cursor.fetchone()[0]

    def copy_csv(self, connection, query):
        """The query's rows as CSV (NULL written as an unquoted NULL, as LOAD DATA reads it); one row per chunk."""
        statement = sql.Composed([sql.SQL("COPY ("), query, sql.SQL(") TO STDOUT WITH (FORMAT csv, NULL 'NULL')")])
        with self.endpoint.driver_errors("COPY"), connection.cursor() as cursor:
            with cursor.copy(statement) as copy:
                yield from copy

    def fetch(self, connection, query, batch_rows):
        """The query's rows as tuples, batch by batch (a server-side cursor: constant memory)."""
        with self.endpoint.driver_errors("query"), connection.cursor(name="dbdeck_local_sync") as cursor:
            cursor.itersize = batch_rows
            cursor.execute(query)
            while rows := cursor.fetchmany(batch_rows):
                yield rows

    # --- watermarks and captured deletions ------------------------------------------------------------
    def snapshot_facts(self, connection):
        """(watermark for this snapshot, whether deletions are captured, oldest watermark they still cover)."""
        with self.endpoint.driver_errors("watermark"), connection.cursor() as cursor:
            cursor.execute(WATERMARK_SQL, {"retention": self.settings.capture_retention_days})
            watermark, horizon = cursor.fetchone()
            installed = relation_exists(connection, DELETES_TABLE)
        return watermark, installed, horizon

    def deleted_keys(self, connection, mapping, since):
        """Keys (target column names) of source rows deleted since the watermark, minus the overlap."""
        capture = mapping.capture_deletes
        source_columns = [capture.key_columns.get(k, k) for k in mapping.key]
        with self.endpoint.driver_errors("captured deletions"), connection.cursor() as cursor:
            cursor.execute(
                sql.SQL("SELECT DISTINCT row_key FROM {} WHERE source_table = %s "
                        "AND deleted_at >= %s::timestamptz - make_interval(secs => %s)").format(
                    sql.Identifier(DELETES_TABLE)),
                (qualified(capture.source_table, current_schema(connection)), since, self.settings.overlap_seconds))
            found = [row[0] for row in cursor.fetchall()]
        keys = []
        for row_key in found:
            if all(c in row_key for c in source_columns):
                keys.append({k: row_key[c] for k, c in zip(mapping.key, source_columns)})
        return keys

    @staticmethod
    def key_chunks(keys):
        for start in range(0, len(keys), _KEYS_PER_QUERY):
            yield keys[start:start + _KEYS_PER_QUERY]


def relation_exists(connection, name):
    """Whether a table (name as SQL would write it) exists on the main database."""
    return connection.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0]


def current_schema(connection):
    """The schema unqualified names resolve to: `public`, or the one a Prisma URL's ?schema= names
    (it becomes the connection's search_path, see dbdeck.endpoints)."""
    return connection.execute("SELECT current_schema()").fetchone()[0] or "public"


def qualified(table, schema="public"):
    """'contacts' -> '<schema>.contacts' (how the capture trigger names its table)."""
    return table if "." in table else f"{schema}.{table}"


def split_name(table, schema="public"):
    schema, _, name = qualified(table, schema).partition(".")
    return schema, name


def setup_statements(mappings, schema="public"):
    """DDL on the main database: the deletion log, its trigger per captured table, NOTIFY triggers for
    watch; everything in `schema` (the connection's current schema), named with it, so the triggers
    work whatever search_path the application's sessions use."""
    deletes = sql.Identifier(schema, DELETES_TABLE)
    statements = [
        sql.SQL("CREATE TABLE IF NOT EXISTS {} (id bigserial PRIMARY KEY, source_table text NOT NULL, "
                "row_key jsonb NOT NULL, deleted_at timestamptz NOT NULL DEFAULT clock_timestamp())").format(deletes),
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (deleted_at)").format(
            sql.Identifier(DELETES_TABLE + "_deleted_at"), deletes),
        # keys only (no other column reaches the log); arguments are the key columns
        sql.SQL("""CREATE OR REPLACE FUNCTION {schema}.dbdeck_local_sync_capture() RETURNS trigger
LANGUAGE plpgsql AS $f$
BEGIN
    INSERT INTO {deletes} (source_table, row_key)
    SELECT TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME,
           (SELECT jsonb_object_agg(k, to_jsonb(o) -> k) FROM unnest(TG_ARGV) AS k)
    FROM old_rows AS o;
    PERFORM pg_notify({channel}, TG_TABLE_NAME);
    RETURN NULL;
END $f$""").format(schema=sql.Identifier(schema), deletes=deletes, channel=sql.Literal(NOTIFY_CHANNEL)),
        sql.SQL("""CREATE OR REPLACE FUNCTION {schema}.dbdeck_local_sync_notify() RETURNS trigger
LANGUAGE plpgsql AS $f$
BEGIN
    PERFORM pg_notify({channel}, TG_TABLE_NAME);
    RETURN NULL;
END $f$""").format(schema=sql.Identifier(schema), channel=sql.Literal(NOTIFY_CHANNEL)),
    ]
    captured, watched = {}, []
    for mapping in mappings:
        if mapping.capture_deletes:
            columns = [mapping.capture_deletes.key_columns.get(k, k) for k in mapping.key]
            captured[qualified(mapping.capture_deletes.source_table, schema)] = columns
        for table in mapping.source_tables or []:
            if qualified(table, schema) not in watched:
                watched.append(qualified(table, schema))
    for table, columns in captured.items():
        target = sql.Identifier(*split_name(table))
        statements.append(sql.SQL("DROP TRIGGER IF EXISTS dbdeck_local_sync_capture ON {}").format(target))
        statements.append(sql.SQL(
            "CREATE TRIGGER dbdeck_local_sync_capture AFTER DELETE ON {} REFERENCING OLD TABLE AS old_rows "
            "FOR EACH STATEMENT EXECUTE FUNCTION {}.dbdeck_local_sync_capture({})").format(
            target, sql.Identifier(schema), sql.SQL(", ").join(sql.Literal(c) for c in columns)))
    for table in watched:
        target = sql.Identifier(*split_name(table))
        statements.append(sql.SQL("DROP TRIGGER IF EXISTS dbdeck_local_sync_notify ON {}").format(target))
        statements.append(sql.SQL(
            "CREATE TRIGGER dbdeck_local_sync_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {} "
            "FOR EACH STATEMENT EXECUTE FUNCTION {}.dbdeck_local_sync_notify()").format(
            target, sql.Identifier(schema)))
    return statements


def prune_statement(days):
    return sql.SQL("DELETE FROM {} WHERE deleted_at < now() - make_interval(days => {})").format(
        sql.Identifier(DELETES_TABLE), sql.Literal(days))


def check_source_tables(connection, mappings, schema="public"):
    """Every table setup would put a trigger on must exist; say which does not."""
    for mapping in mappings:
        tables = list(mapping.source_tables or [])
        if mapping.capture_deletes:
            tables.append(mapping.capture_deletes.source_table)
        for table in tables:
            if not relation_exists(connection, sql.Identifier(*split_name(table, schema)).as_string(connection)):
                raise DbdeckError(f"local_sync.tables.{mapping.name}: source table {qualified(table, schema)} does "
                                  f"not exist on the main database")
