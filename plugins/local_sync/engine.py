"""One local-sync run: every instance (or one), each table full or incremental, failures contained.

Per instance: the tenant's tables are checked or created (the seed's ensureTablesExist), the main
database is read in one snapshot, and each table is synced in the cheapest correct way (see
target.py). An instance that fails (server down, wrong password, bad data) is reported and the
others go on; the run exits non-zero naming it.
"""

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

from dbdeck import secrets
from dbdeck.errors import ConfigError, DbdeckError, LockBusy, Refused, UsageError
from dbdeck.events import Event

from .source import (DELETES_TABLE, Source, check_source_tables, current_schema, prune_statement,
                     relation_exists, setup_statements)
from .tables import MESSAGES
from .target import Tenant

log = logging.getLogger("dbdeck.local_sync")

PREFIX = "[LocalSync] "


class LocalSync:
    def __init__(self, app, settings, echo):
        self.app = app
        self.settings = settings
        self.echo = echo
        self.dry_run = app.dry_run
        self.messages = MESSAGES[settings.language]
        self.source_endpoint = app.endpoint(settings.source, "local_sync.source")
        if not self.source_endpoint.has_driver_access:
            raise ConfigError("local_sync.source: no connection to the main database: set DATABASE_URL (or "
                              "local_sync.source.dsn, or an endpoint with a host)")
        if self.source_endpoint.kind != "postgresql":
            raise ConfigError("local_sync.source must be a PostgreSQL endpoint (the main database)")
        self.source = Source(self.source_endpoint, settings)
        self._warned = set()
        self._output = threading.Lock()

    # --- instances -----------------------------------------------------------------------------------
    def instances(self, only=None):
        """[(name, Endpoint)] for the configured instances (and those instances_query finds)."""
        from dbdeck.config import validate_model
        from dbdeck.endpoints import Endpoint

        from .model import INSTANCE_NAME, InstanceConfig

        listed = {instance.name: instance for instance in self.settings.instances}
        names = list(listed)
        if self.settings.instances_query and not (only and only in listed):
            with self.source_endpoint.connect() as connection, self.source_endpoint.driver_errors("instances_query"):
                found = [str(row[0]) for row in connection.execute(self.settings.instances_query).fetchall()]
            bad = [name for name in found if not INSTANCE_NAME.match(name)]
            if bad:
                raise DbdeckError(f"instances_query returned names that cannot be instances: {', '.join(bad[:5])}")
            names += [name for name in found if name not in listed]
        if only:
            if only not in names:  # a typo must not become a database name on the tenant server
                known = ", ".join(names) or "none configured"
                raise UsageError(f"no instance {only!r} (known: {known})")
            validate_model(InstanceConfig, {"name": only}, ("--instance",))
            names = [only]
        if not names:
            raise UsageError("no instances to sync: list them under local_sync.instances, or set instances_query "
                             "and target_server")
        result = []
        for name in names:
            instance = listed.get(name)
            if instance is not None and instance.target is not None:
                result.append((name, self.app.endpoint(instance.target, f"local_sync.instances.{name}")))
                continue
            server = self.settings.target_server
            config = self.app.config.endpoint_config(server) if isinstance(server, str) else server
            database = self.settings.database_pattern.format(instance=name)
            result.append((name, Endpoint(name, config.model_copy(update={"database": database}), self.app.runner)))
        return result

    # --- run -----------------------------------------------------------------------------------------
    def run(self, only=None, full=False):
        instances = self.instances(only)
        buffered = self.settings.jobs > 1 and len(instances) > 1
        started = time.monotonic()

        def one(item):
            name, endpoint = item
            lines = []
            say = lines.append if buffered else self._say
            try:
                outcome = self._locked(name, lambda: self.sync_instance(name, endpoint, full, say))
            except LockBusy as exc:
                outcome = {"instance": name, "status": "skipped", "error": str(exc)}
                say(f"{name}: {exc}")
            except Exception as exc:  # one tenant's failure, whatever it is, must not stop the others
                if not isinstance(exc, DbdeckError):
                    log.debug("instance %s", name, exc_info=True)
                error = secrets.mask(str(exc) if isinstance(exc, DbdeckError) else f"{type(exc).__name__}: {exc}")
                outcome = {"instance": name, "status": "failed", "error": error}
                say(self.messages["failed"].format(instance=name, error=error))
            with self._output:
                for line in lines:
                    self._say(line)
            return outcome

        with ThreadPoolExecutor(max_workers=min(self.settings.jobs, len(instances))) as pool:
            outcomes = list(pool.map(one, instances))
        self._prune_captured_deletions()
        failed = [o for o in outcomes if o["status"] == "failed"]
        if failed:
            names = ", ".join(f"{o['instance']} ({o['error']})" for o in failed)
            self._say(self.messages["failed_summary"].format(count=len(failed), total=len(outcomes), names=names))
            if not self.dry_run:
                self.app.notify(Event("local_sync.failed", f"local-sync failed for {len(failed)} instance(s): "
                                      f"{', '.join(o['instance'] for o in failed)}", severity="warning"))
        return {"instances": outcomes, "failed": [o["instance"] for o in failed],
                "skipped": [o["instance"] for o in outcomes if o["status"] == "skipped"],
                "seconds": round(time.monotonic() - started, 3)}

    def _locked(self, name, work):
        with self.app.lock(f"local-sync.{name}"):
            return work()

    def sync_instance(self, name, endpoint, full, say):
        m = self.messages
        say(m["start"].format(instance=name))
        say(m["checking"].format(instance=name))
        tenant = Tenant(endpoint, self.settings, dry_run=self.dry_run, say=say)
        tenant.open()
        connection = None
        try:
            with tenant.errors("state table"):
                state = tenant.state()
            other = {row["instance"] for row in state.values()} - {name}
            if other:
                raise Refused(f"{endpoint.describe()} holds the tables of instance {sorted(other)[0]}; "
                              f"not writing instance {name} over them")
            connection = self.source.connect()
            watermark, captured, horizon = self.source.snapshot_facts(connection)
            # every source query is checked against the tenant's columns before anything is written
            # (a table that is yet to be created from its DDL is checked right after)
            types = {}
            for mapping in self.settings.tables:
                known = mapping.columns or tenant.columns(mapping.name)
                if known:
                    types[mapping.name] = self.source.shape(connection, mapping, name, known)
            with tenant.errors("state table"):
                tenant.ensure_state_table()
            columns = {}
            for mapping in self.settings.tables:
                columns[mapping.name] = tenant.ensure_table(mapping)
                if mapping.name not in types:
                    types[mapping.name] = self.source.shape(connection, mapping, name, columns[mapping.name])
                say(m["table_ok"].format(table=mapping.name))
            tables, parts = {}, []
            for mapping in self.settings.tables:
                long_label, short_label = mapping.labels(self.settings.language)
                say(m["syncing"].format(label=long_label, instance=name))
                started = time.monotonic()
                result = self._sync_table(tenant, connection, mapping, name, columns[mapping.name],
                                          types[mapping.name], state.get(mapping.name), (watermark, captured, horizon),
                                          full)
                if not self.dry_run:
                    tenant.connection.commit()
                result["seconds"] = round(time.monotonic() - started, 3)
                tables[mapping.name] = result
                say(m["synced"].format(count=result["rows"], label=long_label))
                if result["removed"]:
                    say(m["removed"].format(count=result["removed"], label=long_label))
                parts.append(f"{result['rows']} {short_label}")
            say(m["done"].format(instance=name))
            say(m["summary"].format(parts=", ".join(parts)))
            return {"instance": name, "status": "ok", "target": endpoint.describe(), "tables": tables}
        finally:
            if connection is not None:
                connection.close()
            tenant.close()

    def _sync_table(self, tenant, connection, mapping, instance, columns, types, previous, snapshot, full):
        watermark, captured, horizon = snapshot
        since = previous["watermark"] if previous else None
        mode, reason = "incremental", None
        if full:
            mode, reason = "full", "--full"
        elif not mapping.watermark:
            mode, reason = "full", "no watermark column"
        elif since is None:
            mode, reason = "full", "first sync"
        elif mapping.capture_deletes and captured and _older(since, horizon, self.settings.overlap_seconds):
            mode, reason = "full", "last sync older than the captured deletions"
        if mapping.capture_deletes and not captured and mode == "incremental":
            self._warn_once(f"{mapping.name}: deletions in {mapping.capture_deletes.source_table} reach the tenants "
                            f"only with full syncs until `local-sync setup` installs the capture trigger")
        log.info("%s.%s: %s sync%s", instance, mapping.name, mode, f" ({reason})" if reason else "")
        stamp = watermark.isoformat()
        if mode == "full":
            query = self.source.select(connection, mapping, instance, columns, types)
            blockers = []
            if tenant.table_exists(mapping.name):
                blockers = tenant.swap_blockers(mapping.name)
                # a rebuilt table would lose what the tenant keeps in columns the source does not feed
                unfed = [c for c in tenant.columns(mapping.name) if c not in columns]
                if unfed:
                    blockers.append(f"column(s) {', '.join(unfed)} not fed by the source query")
            if blockers:
                log.info("%s: merging instead of swapping (%s)", mapping.name, ", ".join(blockers))
                stage = tenant.stage(mapping)
                rows = tenant.load(stage, columns, self.source, connection, query)
                removed, method = tenant.merge(mapping, columns, stage, delete_missing=True), "merge"
            else:
                rows, removed, method = tenant.full_swap(mapping, columns, self.source, connection, query)
            collapsed = self._report_collapsed(tenant, mapping)
            tenant.record(mapping.name, instance, stamp, "full", rows)
            return {"mode": "full", "method": method, "reason": reason, "rows": rows, "removed": removed or 0,
                    "collapsed": collapsed}

        query = self.source.select(connection, mapping, instance, columns, types, since=since)
        deleted = self.source.deleted_keys(connection, mapping, since) if mapping.capture_deletes and captured else []
        changed = self.source.count(connection, query)
        removed = rows = read = 0
        if changed or deleted:
            stage = tenant.stage(mapping)
            read = tenant.load(stage, columns, self.source, connection, query) if changed else 0
            collapsed = self._report_collapsed(tenant, mapping) if changed else 0
            absent = []
            for chunk in self.source.key_chunks(deleted):
                present = self.source.select(connection, mapping, instance, columns, types, keys=chunk)
                still_there = set()
                for batch in self.source.fetch(connection, present, self.settings.insert_batch_rows):
                    still_there.update(tuple(row[columns.index(k)] for k in mapping.key) for row in batch)
                    if not self.dry_run:
                        tenant.insert_rows(stage, columns, [batch])
                absent += [key for key in chunk if tuple(key[k] for k in mapping.key) not in still_there]
            removed = tenant.merge(mapping, columns, stage, delete_keys=absent)
            # the overlap window re-reads rows already there: only those inserted or changed count
            rows = tenant.written if not self.dry_run else read
        else:
            collapsed = 0
        tenant.record(mapping.name, instance, stamp, "incremental", rows)
        return {"mode": "incremental", "method": "merge", "reason": None, "rows": rows, "read": read,
                "removed": removed or 0, "collapsed": collapsed}

    def _report_collapsed(self, tenant, mapping):
        if tenant.collapsed:
            log.warning("%s: %d source row(s) shared a key (primary or unique) with a later row; the later one "
                        "was kept", mapping.name, tenant.collapsed)
        return tenant.collapsed

    def _prune_captured_deletions(self):
        if not any(m.capture_deletes for m in self.settings.tables):
            return
        try:
            with self.source_endpoint.connect() as connection:
                if not relation_exists(connection, DELETES_TABLE):
                    return
                statement = prune_statement(self.settings.capture_retention_days)
                if self.dry_run:
                    self.app.runner.say(f"would execute on main: {statement.as_string(connection)}")
                else:
                    connection.execute(statement)
        except Exception as exc:  # housekeeping: never fails a run that synced
            log.warning("could not prune %s: %s", DELETES_TABLE, secrets.mask(str(exc)))

    # --- setup and status -----------------------------------------------------------------------------
    def setup(self):
        """Install the deletion capture and NOTIFY triggers on the main database (idempotent)."""
        with self.source_endpoint.connect(autocommit=False) as connection:
            with self.source_endpoint.driver_errors("setup"):
                schema = current_schema(connection)
                check_source_tables(connection, self.settings.tables, schema)
                for statement in setup_statements(self.settings.tables, schema):
                    if self.dry_run:
                        self.app.runner.say(f"would execute on main: {statement.as_string(connection)};")
                    else:
                        connection.execute(statement)
                connection.commit()

    def status(self, only=None):
        """Per instance and table: last sync, mode, watermark, rows on both sides, lag."""
        rows = []
        for name, endpoint in self.instances(only):
            entry = {"instance": name, "target": endpoint.describe(), "reachable": True, "tables": {}}
            rows.append(entry)
            tenant = Tenant(endpoint, self.settings, dry_run=True)
            try:
                tenant.open()
                state = tenant.state()
                connection = self.source.connect()
                try:
                    for mapping in self.settings.tables:
                        exists = tenant.table_exists(mapping.name)
                        row = state.get(mapping.name) or {}
                        columns = tenant.ensure_table(mapping) if exists else list(mapping.columns or [])
                        types = self.source.shape(connection, mapping, name, columns)
                        source_rows = self.source.count(
                            connection, self.source.select(connection, mapping, name, columns, types))
                        last = row.get("last_sync")
                        entry["tables"][mapping.name] = {
                            "last_sync": last.isoformat() + "Z" if last else None,
                            "last_full_sync": row["last_full_sync"].isoformat() + "Z"
                            if row.get("last_full_sync") else None,
                            "last_mode": row.get("last_mode"),
                            "watermark": row.get("watermark"),
                            "source_rows": source_rows,
                            "target_rows": tenant.row_count(mapping.name) if exists else None,
                            "lag_seconds": _seconds_since(last),
                        }
                finally:
                    connection.close()
            except DbdeckError as exc:
                entry["reachable"] = False
                entry["error"] = str(exc)
            finally:
                tenant.close()
        return rows

    # --- output --------------------------------------------------------------------------------------
    def _say(self, line):
        log.info(line)
        self.echo(PREFIX + line)

    def _warn_once(self, message):
        if message not in self._warned:
            self._warned.add(message)
            log.warning(message)
            self.echo(PREFIX + "WARNING: " + message)


def _seconds_since(utc_naive):
    """Seconds from a DATETIME the tenant stored in UTC (UTC_TIMESTAMP()) to now, or None."""
    if utc_naive is None:
        return None
    return round((datetime.now(timezone.utc).replace(tzinfo=None) - utc_naive).total_seconds())


def _older(since, horizon, overlap_seconds):
    """Whether a stored watermark (ISO text) minus the overlap is before the capture horizon."""
    try:
        stamp = datetime.fromisoformat(since)
    except ValueError:
        return True
    return stamp - timedelta(seconds=overlap_seconds) < horizon
