"""One sync round: each side's unsynced changelog entries applied to the other side, batch by batch.

Per batch: the source's oldest unsynced entries (by id, at most batch_size) are streamed by COPY into
a temporary table on the target; there, in one transaction with the apply marker set (so the target's
triggers log nothing: no echo), entries for one key collapse to the latest, each is compared with
the target's current version of that key (its row, else its tombstone) and applied only if newer;
then the source acknowledges exactly those entry ids by deleting them (cheaper than marking them
synced: no new row versions; the seed's `WHERE synced = FALSE` still lists what is pending). The
cursor is "still in the changelog", never "id > last seen": a transaction that commits late with a
smaller id is simply read next time.
A crash after the apply and before the acknowledgement re-reads the batch next round; re-applying is
a no-op because a version never beats itself.

Versions are ordered by (timestamp, is-delete, md5 of the row as jsonb), a total order both sides
compute alike, so the same winner is chosen whatever the order of rounds: last write wins, with a
deterministic tie-break. A conflict is an incoming change for a key the target has changed too and
not yet sent; conflicts are counted and logged with the winning side.
"""

import logging
import os
import time
from pathlib import Path

from psycopg import sql

from dbdeck import output
from dbdeck.errors import DbdeckError
from dbdeck.state import StateFile

from .schema import APPLY_MARKER, TableNames, check_table, setup_statements

log = logging.getLogger("dbdeck.sync_databases")

STATE_FILE = "sync-databases.json"
SIDES = ("local", "external")


def failpoint(name):
    """Fault injection for the crash tests: DBDECK_FAILPOINT=sync-databases:<name> dies here like kill -9."""
    if os.environ.get("DBDECK_FAILPOINT") == f"sync-databases:{name}":
        os._exit(137)


class Sync:
    def __init__(self, app, settings, say=print):
        self.app = app
        self.settings = settings
        self.say = say
        self.endpoints = {side: app.endpoint(getattr(settings, side), f"sync_databases.{side}") for side in SIDES}
        for side, endpoint in self.endpoints.items():
            if not endpoint.has_driver_access:
                variable = "DATABASE_URL" if side == "local" else "EXTERNAL_DB_URL"
                raise DbdeckError(f"sync_databases.{side}: no connection: set {variable} (or sync_databases.{side}"
                                  f".dsn / an endpoint with a host)")
        self.tables = [TableNames(spec) for spec in settings.tables]
        self.state = StateFile(Path(app.config.state_dir) / STATE_FILE)

    def connect(self, side, autocommit=True):
        return self.endpoints[side].connect(autocommit=autocommit)

    # --- setup ------------------------------------------------------------------------------------
    def setup(self):
        """Check every table on both sides first, so bad config changes nothing; then the DDL per side."""
        connections = {side: self.connect(side, autocommit=False) for side in SIDES}
        try:
            for side, connection in connections.items():
                with self._errors(side):
                    for names in self.tables:
                        check_table(connection, names, side)
            for side, connection in connections.items():
                with self._errors(side):
                    for names in self.tables:
                        for statement in setup_statements(names):
                            if self.app.dry_run:
                                self.app.runner.say(f"would execute on {side}: {statement.as_string(connection)};")
                            else:
                                connection.execute(statement)
                        if not self.app.dry_run:
                            self.say(f"{side}: changelog, tombstones and triggers in place for {names.spec.name}")
            for connection in connections.values():
                connection.rollback() if self.app.dry_run else connection.commit()
        finally:
            for connection in connections.values():
                connection.close()

    # --- a round ----------------------------------------------------------------------------------
    def run(self, directions):
        started = time.monotonic()
        deadline = started + self.settings.max_round_seconds
        connections = {side: self.connect(side) for side in SIDES}
        totals = {}
        try:
            columns = {}
            for names in self.tables:
                for side in SIDES:
                    with self._errors(side):
                        columns[(side, names.spec.name)] = check_table(connections[side], names, side)
                        self._require_setup(connections[side], names, side)
            for source, target in directions:
                for names in self.tables:
                    counts = self._transfer(connections, source, target, names,
                                            columns[(target, names.spec.name)], deadline)
                    totals[f"{source}->{target}:{names.spec.name}"] = counts
                    self.say(f"{source} -> {target} {names.spec.name}: {counts['read']} change(s) read, "
                             f"{counts['applied']} applied, {counts['older']} older than the target's version, "
                             f"{counts['conflicts']} conflict(s)")
            if not self.app.dry_run:
                for side in SIDES:
                    with self._errors(side):
                        self._purge(connections[side])
        finally:
            for connection in connections.values():
                connection.close()
        seconds = round(time.monotonic() - started, 2)
        if not self.app.dry_run:
            conflicts = sum(c["conflicts"] for c in totals.values())
            previous = self.state.entry("rounds")
            self.state.update("rounds", last_success=output.timestamp(), seconds=seconds,
                              last=totals, conflicts_total=previous.get("conflicts_total", 0) + conflicts)
        return {"seconds": seconds, "directions": totals}

    def _require_setup(self, connection, names, side):
        present = connection.execute("SELECT to_regclass(%s) IS NOT NULL",
                                     (names.changelog.as_string(connection),)).fetchone()[0]
        if not present:
            raise DbdeckError(f"{side}: {names.spec.name} has no changelog yet; run `sync-databases setup` first")

    def _transfer(self, connections, source, target, names, columns, deadline):
        counts = {"read": 0, "applied": 0, "older": 0, "conflicts": 0, "batches": 0}
        src, dst = connections[source], connections[target]
        if self.app.dry_run:
            pending = src.execute(sql.SQL("SELECT count(*) FROM {} WHERE NOT synced").format(names.changelog)
                                  ).fetchone()[0]
            self.app.runner.say(f"would apply {pending} pending change(s) of {names.spec.name} from {source} to "
                                f"{target} in batches of {self.settings.batch_size}")
            return counts
        dst.autocommit = False
        try:
            while True:
                with self._errors(target):
                    batch = self._apply_batch(src, dst, names, columns, source, target)
                if batch is None:
                    break
                ids, applied, older, conflicts = batch
                failpoint("after-apply")
                with self._errors(source):
                    src.execute(sql.SQL("DELETE FROM {} WHERE id = ANY(%s)").format(names.changelog), (ids,))
                counts["read"] += len(ids)
                counts["applied"] += applied
                counts["older"] += older
                counts["conflicts"] += conflicts
                counts["batches"] += 1
                if len(ids) < self.settings.batch_size:
                    break
                if time.monotonic() > deadline:
                    self.say(f"{source} -> {target} {names.spec.name}: round time limit reached; the rest waits "
                             f"for the next round")
                    break
        finally:
            dst.rollback()
            dst.autocommit = True
        return counts

    def _apply_batch(self, src, dst, names, columns, source, target):
        """Apply one batch in one target transaction; (ids, applied, older, conflicts), None when empty."""
        dst.execute(sql.SQL("SELECT set_config({}, 'on', true), set_config('TimeZone', 'UTC', true)").format(
            sql.Literal(APPLY_MARKER)))
        dst.execute("CREATE TEMP TABLE IF NOT EXISTS dbdeck_incoming (id bigint, op char(1), pk jsonb, data jsonb, "
                    "changed_at timestamptz) ON COMMIT DELETE ROWS")
        read = sql.SQL("COPY (SELECT id, op, pk, data, changed_at FROM {} WHERE NOT synced ORDER BY id LIMIT {}) "
                       "TO STDOUT").format(names.changelog, sql.Literal(self.settings.batch_size))
        with src.cursor().copy(read) as out, dst.cursor().copy(
                "COPY dbdeck_incoming (id, op, pk, data, changed_at) FROM STDIN") as into:
            for chunk in out:
                into.write(chunk)
        ids = dst.execute("SELECT coalesce(array_agg(id), '{}') FROM dbdeck_incoming").fetchone()[0]
        if not ids:
            dst.rollback()
            return None
        for statement in apply_statements(names, columns):
            dst.execute(statement)
        applied, older, conflicts = dst.execute(
            "SELECT count(*) FILTER (WHERE wins), count(*) FILTER (WHERE NOT wins), count(*) FILTER (WHERE conflict) "
            "FROM dbdeck_decided").fetchone()
        if conflicts:
            examples = dst.execute("SELECT pk::text, wins FROM dbdeck_decided WHERE conflict ORDER BY pk LIMIT 10"
                                   ).fetchall()
            for key, wins in examples:
                log.warning("conflict on %s %s: both sides changed it; %s's version wins (last write by %s)",
                            names.spec.name, key, source if wins else target, names.spec.timestamp)
        dst.commit()
        return list(ids), applied, older, conflicts

    def _purge(self, connection):
        for names in self.tables:
            connection.execute(sql.SQL("DELETE FROM {} WHERE deleted_at < now() - make_interval(days => {})").format(
                names.tombstones, sql.Literal(self.settings.tombstone_days)))

    # --- status -----------------------------------------------------------------------------------
    def status(self):
        sides = {}
        for side in SIDES:
            try:
                with self.connect(side) as connection, self._errors(side):
                    tables = {}
                    for names in self.tables:
                        if not connection.execute("SELECT to_regclass(%s) IS NOT NULL",
                                                  (names.changelog.as_string(connection),)).fetchone()[0]:
                            tables[names.spec.name] = {"pending": None, "note": "not set up"}
                            continue
                        pending, oldest = connection.execute(sql.SQL(
                            "SELECT count(*), min(changed_at)::text FROM {} WHERE NOT synced").format(
                            names.changelog)).fetchone()
                        tables[names.spec.name] = {"pending": pending, "oldest_pending": oldest}
                    sides[side] = {"reachable": True, "tables": tables}
            except DbdeckError as exc:
                sides[side] = {"reachable": False, "error": str(exc)}
        rounds = self.state.entry("rounds")
        return {"sides": sides, "last_success": rounds.get("last_success"),
                "conflicts_total": rounds.get("conflicts_total", 0), "last_round": rounds.get("last")}

    def _errors(self, side):
        return self.endpoints[side].driver_errors(f"sync on {side}")


def apply_statements(names, columns):
    """Set-based apply of dbdeck_incoming into the target table (see the module docstring).

    Each entry's jsonb is turned into a row of the target's type once (LATERAL), kept in
    dbdeck_decided with its key values, and reused by the DELETE and the upsert."""
    target, tombstones, changelog = names.target, names.tombstones, names.changelog
    ts = sql.Identifier(names.spec.timestamp)
    keys = [sql.Identifier(k) for k in names.spec.key]
    key_columns = [sql.Identifier(f"key_{n}") for n in range(len(keys))]

    def joined(parts):
        return sql.SQL(", ").join(parts)

    row_key = joined(sql.SQL("x.{}").format(k) for k in keys)
    decided_key = joined(sql.SQL("d.{}").format(k) for k in key_columns)
    non_keys = [c for c in columns if c not in names.spec.key]
    on_conflict = (sql.SQL("DO UPDATE SET {}").format(joined(
        sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in non_keys)) if non_keys
        else sql.SQL("DO NOTHING"))
    return [
        sql.SQL("DROP TABLE IF EXISTS dbdeck_decided"),
        sql.SQL("""CREATE TEMP TABLE dbdeck_decided ON COMMIT DROP AS
WITH latest AS (
    SELECT DISTINCT ON (pk) op, pk, data, changed_at FROM dbdeck_incoming ORDER BY pk, id DESC
), incoming AS (
    SELECT l.op, l.pk, r AS rec, {incoming_keys},
           CASE WHEN l.op = 'D' THEN l.changed_at ELSE coalesce(r.{ts}::timestamptz, '-infinity') END AS in_ts,
           CASE WHEN l.op = 'D' THEN '' ELSE md5(to_jsonb(r)::text) END AS in_hash
    FROM latest l, LATERAL jsonb_populate_record(NULL::{target}, l.data) r,
         LATERAL jsonb_populate_record(NULL::{target}, l.pk) k
), compared AS (
    SELECT i.*,
           CASE WHEN cur.found THEN cur.ts WHEN tomb.pk IS NOT NULL THEN tomb.deleted_at
                ELSE '-infinity'::timestamptz END AS cur_ts,
           (cur.found IS NULL AND tomb.pk IS NOT NULL) AS cur_deleted,
           coalesce(cur.hash, '') AS cur_hash,
           cur.found IS NOT NULL OR tomb.pk IS NOT NULL AS exists_here
    FROM incoming i
    LEFT JOIN LATERAL (SELECT true AS found, coalesce(x.{ts}::timestamptz, '-infinity') AS ts,
                              md5(to_jsonb(x)::text) AS hash
                       FROM {target} x WHERE ({row_key}) = ({i_keys})) cur ON true
    LEFT JOIN {tombstones} tomb ON tomb.pk = i.pk
)
SELECT op, pk, rec, {key_columns}, in_ts,
       NOT exists_here OR (in_ts, op = 'D', in_hash) > (cur_ts, cur_deleted, cur_hash) AS wins,
       EXISTS (SELECT 1 FROM {changelog} c WHERE NOT c.synced AND c.pk = compared.pk) AS conflict
FROM compared""").format(
            target=target, ts=ts, tombstones=tombstones, changelog=changelog, row_key=row_key,
            incoming_keys=joined(sql.SQL("k.{} AS {}").format(k, c) for k, c in zip(keys, key_columns)),
            i_keys=joined(sql.SQL("i.{}").format(c) for c in key_columns), key_columns=joined(key_columns)),
        sql.SQL("DELETE FROM {target} x USING dbdeck_decided d WHERE d.wins AND d.op = 'D' "
                "AND ({row_key}) = ({decided_key})").format(target=target, row_key=row_key, decided_key=decided_key),
        sql.SQL("INSERT INTO {target} AS x ({columns}) OVERRIDING SYSTEM VALUE "
                "SELECT {rec_columns} FROM dbdeck_decided d WHERE d.wins AND d.op <> 'D' "
                "ON CONFLICT ({keys}) {on_conflict}").format(
            target=target, columns=joined(sql.Identifier(c) for c in columns),
            rec_columns=joined(sql.SQL("(d.rec).{}").format(sql.Identifier(c)) for c in columns),
            keys=joined(keys), on_conflict=on_conflict),
        sql.SQL("INSERT INTO {tombstones} (pk, deleted_at) SELECT pk, in_ts FROM dbdeck_decided "
                "WHERE wins AND op = 'D' ON CONFLICT (pk) DO UPDATE SET deleted_at = EXCLUDED.deleted_at").format(
            tombstones=tombstones),
        sql.SQL("DELETE FROM {tombstones} t USING dbdeck_decided d WHERE d.wins AND d.op <> 'D' AND t.pk = d.pk"
                ).format(tombstones=tombstones),
    ]
