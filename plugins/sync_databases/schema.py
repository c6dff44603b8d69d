"""What `setup` creates on each side, per table T (in T's schema):

  T_changelog          every change users make: op, primary key (jsonb), row (jsonb), time, synced flag
  T_sync_tombstones    deleted keys with their deletion time, so a delete can win or lose a conflict
  T_sync_touch()       BEFORE trigger: a user write that leaves the timestamp unchanged gets clock time
  T_sync_capture()     AFTER trigger: logs the change and keeps tombstones current

Both triggers do nothing while the session variable dbdeck.sync_apply is 'on': that is how the
sync's own writes are kept out of the changelog (no echo). Any role may set a custom variable, so it
works as a plain table owner on managed services, where session_replication_role needs superuser.
"""

from psycopg import sql

from dbdeck.errors import ConfigError

APPLY_MARKER = "dbdeck.sync_apply"


class TableNames:
    def __init__(self, spec):
        self.spec = spec
        self.schema, self.table = spec.schema, spec.table
        for suffix in ("_changelog", "_sync_tombstones", "_sync_capture", "_sync_touch", "_changelog_pending",
                       "_changelog_pending_pk"):
            if len((self.table + suffix).encode()) > 63:
                raise ConfigError(f"sync_databases.tables: {spec.name}: name too long for its helper objects "
                                  f"({self.table + suffix} exceeds PostgreSQL's 63 bytes)")

    def ident(self, suffix=""):
        return sql.Identifier(self.schema, self.table + suffix)

    @property
    def target(self):
        return self.ident()

    @property
    def changelog(self):
        return self.ident("_changelog")

    @property
    def tombstones(self):
        return self.ident("_sync_tombstones")


def pk_object(names, row):
    """jsonb_build_object('id', NEW."id", ...) for the key columns of OLD or NEW."""
    parts = []
    for column in names.spec.key:
        parts += [sql.Literal(column), sql.SQL("{}.{}").format(sql.SQL(row), sql.Identifier(column))]
    return sql.SQL("jsonb_build_object({})").format(sql.SQL(", ").join(parts))


def setup_statements(names):
    """Idempotent DDL for one table on one side, as a list of psycopg Composed statements."""
    ts = sql.Identifier(names.spec.timestamp)
    marker = sql.Literal(APPLY_MARKER)
    capture = names.ident("_sync_capture")
    touch = names.ident("_sync_touch")
    return [
        sql.SQL("""CREATE TABLE IF NOT EXISTS {changelog} (
    id bigserial PRIMARY KEY,
    op char(1) NOT NULL CHECK (op IN ('I', 'U', 'D')),
    pk jsonb NOT NULL,
    data jsonb,
    changed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    synced boolean NOT NULL DEFAULT false,
    synced_at timestamptz)""").format(changelog=names.changelog),
        # the batch read (oldest unsynced first) and the conflict check (unsynced for this key?) stay
        # index lookups however many acknowledged entries the changelog keeps
        sql.SQL("CREATE INDEX IF NOT EXISTS {index} ON {changelog} (id) WHERE NOT synced").format(
            index=sql.Identifier(names.table + "_changelog_pending"), changelog=names.changelog),
        sql.SQL("CREATE INDEX IF NOT EXISTS {index} ON {changelog} (pk) WHERE NOT synced").format(
            index=sql.Identifier(names.table + "_changelog_pending_pk"), changelog=names.changelog),
        sql.SQL("CREATE TABLE IF NOT EXISTS {tombstones} (pk jsonb PRIMARY KEY, deleted_at timestamptz NOT NULL)"
                ).format(tombstones=names.tombstones),
        sql.SQL("""CREATE OR REPLACE FUNCTION {touch}() RETURNS trigger LANGUAGE plpgsql AS $dbdeck$
BEGIN
    IF current_setting({marker}, true) = 'on' THEN
        RETURN NEW;
    END IF;
    IF NEW.{ts} IS NULL OR (TG_OP = 'UPDATE' AND NEW.{ts} IS NOT DISTINCT FROM OLD.{ts}) THEN
        NEW.{ts} := clock_timestamp();
    END IF;
    RETURN NEW;
END
$dbdeck$""").format(touch=touch, marker=marker, ts=ts),
        sql.SQL("""CREATE OR REPLACE FUNCTION {capture}() RETURNS trigger LANGUAGE plpgsql AS $dbdeck$
BEGIN
    IF current_setting({marker}, true) = 'on' THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND {old_pk} IS DISTINCT FROM {new_pk}) THEN
        INSERT INTO {changelog} (op, pk, data, changed_at) VALUES ('D', {old_pk}, NULL, clock_timestamp());
        INSERT INTO {tombstones} (pk, deleted_at) VALUES ({old_pk}, clock_timestamp())
            ON CONFLICT (pk) DO UPDATE SET deleted_at = EXCLUDED.deleted_at;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        INSERT INTO {changelog} (op, pk, data, changed_at)
            VALUES (left(TG_OP, 1), {new_pk}, to_jsonb(NEW), NEW.{ts});
        DELETE FROM {tombstones} WHERE pk = {new_pk};
    END IF;
    RETURN NULL;
END
$dbdeck$""").format(capture=capture, marker=marker, ts=ts, changelog=names.changelog, tombstones=names.tombstones,
                    old_pk=pk_object(names, "OLD"), new_pk=pk_object(names, "NEW")),
        sql.SQL("DROP TRIGGER IF EXISTS {name} ON {table}").format(
            name=sql.Identifier(names.table + "_sync_touch"), table=names.target),
        sql.SQL("CREATE TRIGGER {name} BEFORE INSERT OR UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION {fn}()"
                ).format(name=sql.Identifier(names.table + "_sync_touch"), table=names.target, fn=touch),
        sql.SQL("DROP TRIGGER IF EXISTS {name} ON {table}").format(
            name=sql.Identifier(names.table + "_sync_capture"), table=names.target),
        sql.SQL("CREATE TRIGGER {name} AFTER INSERT OR UPDATE OR DELETE ON {table} FOR EACH ROW "
                "EXECUTE FUNCTION {fn}()").format(name=sql.Identifier(names.table + "_sync_capture"),
                                                   table=names.target, fn=capture),
    ]


COLUMNS_SQL = """
SELECT a.attname AS name, a.attgenerated <> '' AS generated,
       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary AND a.attnum = ANY (i.indkey))
           AS in_primary_key
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')
ORDER BY a.attnum
"""


def check_table(connection, names, side):
    """The table exists with the configured key and timestamp columns; returns its writable columns."""
    rows = connection.execute(COLUMNS_SQL, (names.schema, names.table)).fetchall()
    where = f"sync_databases.tables: {names.spec.name} on the {side} side"
    if not rows:
        raise ConfigError(f"{where}: table {names.schema}.{names.table} does not exist")
    columns = {r[0]: r for r in rows}
    missing = [c for c in (*names.spec.key, names.spec.timestamp) if c not in columns]
    if missing:
        raise ConfigError(f"{where}: no column {', '.join(missing)} (have: {', '.join(columns)})")
    primary = sorted(name for name, r in columns.items() if r[2])
    if primary != sorted(names.spec.key):
        raise ConfigError(f"{where}: key {names.spec.key} is not the table's primary key ({primary or 'none'}); "
                          f"upserts need a primary key on exactly the key columns")
    return [name for name, r in columns.items() if not r[1]]
