"""The prod -> dev clone: build a staging database beside dev, then swap it in by rename.

Dev is either the old copy or the complete new one: the new copy is restored into
`<dev>__dbdeck_staging` and only a single transaction renames dev away and staging into its place.
A failure or kill -9 before that leaves dev untouched; the next run drops the stray staging (and
the `<dev>__dbdeck_old` a kill after the swap may leave) and re-allows connections to dev if a run
died while it had them switched off. Prod is only read (pg_dump's own ACCESS SHARE locks).
"""

import glob
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path

from psycopg import sql

from dbdeck import faults, output
from dbdeck.endpoints import Endpoint, dbname_argument
from dbdeck.errors import DbdeckError, Refused
from dbdeck.run import hold_termination, printable
from dbdeck.state import StateFile

from . import quick as probes
from .parallel import StallWatch

log = logging.getLogger("dbdeck.sync_prod_to_dev")

STAGING_SUFFIX = "__dbdeck_staging"
OLD_SUFFIX = "__dbdeck_old"
STATE_FILE = "sync-prod-to-dev.json"

USER_SCHEMAS = "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'"
OWNERS_SQL = f"""
SELECT pg_get_userbyid(c.relowner) AS role FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE {USER_SCHEMAS}
UNION SELECT pg_get_userbyid(n.nspowner) FROM pg_namespace n WHERE {USER_SCHEMAS}
UNION SELECT pg_get_userbyid(p.proowner) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE {USER_SCHEMAS}
UNION SELECT pg_get_userbyid(t.typowner) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
 WHERE {USER_SCHEMAS}
"""
GRANTEES_SQL = f"""
SELECT DISTINCT pg_get_userbyid(a.grantee) AS role
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(c.relacl) a
WHERE {USER_SCHEMAS} AND a.grantee <> 0
UNION SELECT pg_get_userbyid(a.grantee) FROM pg_namespace n, aclexplode(n.nspacl) a
WHERE {USER_SCHEMAS} AND a.grantee <> 0
"""

def on_database(endpoint, database, name=None):
    """The same server as endpoint, another database (maintenance db, staging db)."""
    return Endpoint(name or f"{endpoint.name}:{database}", endpoint.config.model_copy(update={"database": database}),
                    endpoint.runner)


def table_pattern(name):
    """A pg_dump -t pattern matching exactly this (optionally schema-qualified) table name."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split(".", 1))


PG_IDENTIFIER_MAX_BYTES = 63


def work_database_name(dev, suffix):
    """`<dev><suffix>`, or, when that exceeds PostgreSQL's 63 bytes (the server would cut it, and the
    staging and old names would become the same name), dev's first bytes + a hash of dev + suffix:
    distinct per dev and per suffix, and stable between runs so leftovers are found again."""
    name = dev + suffix
    if len(name.encode()) <= PG_IDENTIFIER_MAX_BYTES:
        return name
    tag = "_" + hashlib.sha256(dev.encode()).hexdigest()[:8]
    room = PG_IDENTIFIER_MAX_BYTES - len((tag + suffix).encode())
    head = dev.encode()[:room].decode(errors="ignore")
    return head + tag + suffix


class Clone:
    def __init__(self, app, settings, force=False, say=print):
        self.app = app
        self.settings = settings
        self.force = force
        self.say = say
        self.runner = app.runner
        self.source = app.endpoint(settings.source, "sync_prod_to_dev.source")
        self.target = app.endpoint(settings.target, "sync_prod_to_dev.target")
        if not self.target.database:
            raise DbdeckError("sync_prod_to_dev.target: no database name (set database: or DEV_DATABASE)")
        self.dev = self.target.database
        self.staging = work_database_name(self.dev, STAGING_SUFFIX)
        self.old = work_database_name(self.dev, OLD_SUFFIX)
        self.maintenance = on_database(self.target, "postgres", "dev-server")
        self.state = StateFile(Path(app.config.state_dir) / STATE_FILE)

    # --- checks -----------------------------------------------------------------------------------
    def survey(self):
        """One query per side (connections cost more than these queries on an unchanged-prod run):
        prod's identity, version and change probe; dev server's identity, version, databases, dev probe."""
        prod = self.source.query("SELECT (SELECT system_identifier::text FROM pg_control_system()) AS server, "
                                 "current_database() AS db, current_setting('server_version_num') AS version, ("
                                 + probes.PROD_PROBE + ") AS probe")[0]
        dev = self.maintenance.query(sql.SQL(
            "SELECT (SELECT system_identifier::text FROM pg_control_system()) AS server, "
            "current_setting('server_version_num') AS version, (SELECT json_agg(json_build_object("
            "'datname', datname, 'datallowconn', datallowconn, 'owner', pg_get_userbyid(datdba))) "
            "FROM pg_database) AS databases, ({probe}) AS probe").format(probe=self.dev_probe_sql()))[0]
        databases = dev["databases"]
        if isinstance(databases, str):
            databases = json.loads(databases)
        return prod, dev, {d["datname"]: d for d in databases}

    def dev_probe_sql(self):
        return sql.SQL(probes.DEV_PROBE_TEMPLATE).format(dev=sql.Literal(self.dev), staging=sql.Literal(self.staging),
                                                         old=sql.Literal(self.old))

    def dev_probe(self):
        return str(self.maintenance.query(sql.SQL("SELECT ({}) AS probe").format(self.dev_probe_sql()))[0]["probe"])

    def dev_content_sql(self):
        """The fingerprint of dev itself, leaving out the excluded tables (dev's own, kept across syncs)."""
        excluded = sql.SQL(", ").join(sql.Literal(table_pattern(t if "." in t else f"public.{t}"))
                                      for t in self.settings.exclude_tables)
        return probes.fingerprint_sql(excluded.as_string(None) if self.settings.exclude_tables else "")

    def dev_content(self, dev_probe):
        """dev's fingerprint (developers' writes, DDL, a dump restored into it, a restart all change it), or
        None when dev is missing or closed."""
        if not probes.dev_is_sound(dev_probe):
            return None
        return str(self.target.query("SELECT (" + self.dev_content_sql() + ") AS content")[0]["content"])

    def recipe(self):
        """A digest of everything that shapes dev besides prod's content: a change to any of it means
        the next run copies again even though prod is unchanged (new anonymisation rules must apply)."""
        from dbdeck import __version__

        settings = self.settings
        shaping = settings.model_dump(mode="json", exclude={
            "source", "target", "log_dir", "dump_dir", "keep_dumps", "skip_unchanged", "allow_production_target",
            "timeout", "stall_timeout", "jobs", "anonymize_salt"})
        salt = settings.anonymize_salt.get_secret_value() if settings.anonymize_salt else None
        shaping.update(dbdeck=__version__, source=self.source.describe(), target=self.target.describe(),
                       salt=salt)
        return hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()

    def check_safety(self, prod, dev):
        if self.target.role == "production" and not self.settings.allow_production_target:
            raise Refused(f"refusing to overwrite {self.target.describe()}: it is marked role: production "
                          f"(sync-prod-to-dev writes only to a development copy)")
        if self.source.role in ("development", "test", "sandbox") and self.target.role == "production":
            raise Refused("refusing to run reversed: the source is a development database and the target production")
        # dev's server and name, not a connection to dev: on the first sync dev does not exist yet
        if (str(prod["server"]), str(prod["db"])) == (str(dev["server"]), self.dev):
            raise Refused(f"refusing to sync: source and target are the same database "
                          f"({self.source.describe()} and {self.target.describe()})")
        production = self._configured_production_at_target()
        if production and not self.settings.allow_production_target:
            raise Refused(f"refusing to overwrite {self.target.describe()}: it names the same server and database "
                          f"as endpoint {production}, which is marked role: production")
        source_major, target_major = int(prod["version"]) // 10000, int(dev["version"]) // 10000
        if source_major > target_major:
            raise DbdeckError(f"prod runs PostgreSQL {source_major} and dev {target_major}: "
                              f"restoring into an older major version is not supported; upgrade dev first")
        self._check_roles()

    def _configured_production_at_target(self):
        """The name of an endpoint marked role: production that the target (possibly an inline mapping
        or one assembled from the seed's variables) names too: same host and port, or same container,
        and the same database."""
        target = self.target
        for name, config in self.app.config.endpoints.items():
            if config.role != "production" or config.kind != target.kind:
                continue
            other = Endpoint(name, config, self.runner)
            if other.database != self.dev:
                continue
            same_host = bool(other.host) and (other.host, other.port or 5432) == (target.host, target.port or 5432)
            same_container = bool(other.container) and other.container == target.container
            if same_host or same_container:
                return name
        return None

    def _check_roles(self):
        """Keeping owners or grants needs prod's roles on dev's server; name the missing ones up front."""
        wanted = ([OWNERS_SQL] if self.settings.keep_owner else []) + \
            ([GRANTEES_SQL] if self.settings.keep_privileges else [])
        if not wanted:
            return
        needed = {r["role"] for r in self.source.query(" UNION ".join(q.strip() for q in wanted))}
        present = {r["rolname"] for r in self.maintenance.query("SELECT rolname FROM pg_roles")}
        missing = sorted(needed - present)
        if missing:
            raise DbdeckError(f"keep_owner/keep_privileges: role(s) {', '.join(missing)} own objects or hold "
                              f"grants in prod but do not exist on dev's server; create them there "
                              f"(CREATE ROLE ...) or set keep_owner/keep_privileges: false")

    def _check_client_tools(self, source_major):
        """pg_dump refuses servers newer than itself; say so before creating anything."""
        if self.source.container:
            return  # the container's own pg_dump matches its server
        output = self.runner.run(["pg_dump", "--version"], read_only=True).stdout
        match = re.search(r"(\d+)(?:\.\d+)?", output)
        if match and int(match.group(1)) < source_major:
            raise DbdeckError(f"the pg_dump on PATH is version {match.group(1)} but prod runs PostgreSQL "
                              f"{source_major}: install postgresql-client-{source_major} (pg_dump cannot dump "
                              f"a newer server)")

    def _state_key(self):
        return hashlib.sha256(f"{self.source.describe()} -> {self.target.describe()}".encode()).hexdigest()[:16]

    def last_sync(self):
        return self.state.entry(self._state_key()) or None

    def _record(self, prod_probe, recipe, dev_probe, dev_content, seconds):
        self.state.update(self._state_key(), prod=prod_probe, recipe=recipe, dev=dev_probe, dev_content=dev_content,
                          finished_at=output.timestamp(), seconds=round(seconds, 2),
                          source=self.source.describe(), target=self.target.describe())

    def unchanged_since(self, last, prod_probe, recipe, dev_probe, dev_content):
        """Why the last sync's copy is still current (None: copy): prod, recipe and dev all as it left them."""
        if not (self.settings.skip_unchanged and not self.force and last):
            return None
        if (last.get("prod"), last.get("recipe"), last.get("dev"), last.get("dev_content")) != \
                (prod_probe, recipe, dev_probe, dev_content):
            return None
        return last["finished_at"] if probes.dev_is_sound(dev_probe) else None

    def offer_quick_answer(self, prod_probe, dev_probe, dev_content, finished_at):
        """Leave the probes and their answers for the next start of this command line (dbdeck.quick)."""
        from dbdeck import quick

        # a --format json run is answered by the full path: the quick one prints its lines, not a document
        if (self.runner.dry_run or not self.settings.skip_unchanged or self.force or quick.pending() is None
                or dev_content is None or self.app.format == "json"):
            return
        config = self.app.config
        env_files = [f for f in {**quick.pending()["files"], **config.sources}
                     if not config.path or f != str(config.path.absolute())]
        stamped = []
        for endpoint, query, expect in ((self.source, probes.PROD_PROBE, prod_probe),
                                        (self.maintenance, self.dev_probe_sql().as_string(None), dev_probe),
                                        (self.target, self.dev_content_sql(), dev_content)):
            argv, env = endpoint.tool_invocation("psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-c",
                                                 query)
            if argv[0] == "psql":
                argv[0] = quick.direct_program("psql")
            env.setdefault("PGCONNECT_TIMEOUT", str(endpoint.config.connect_timeout))
            portable = quick.portable_env(env, endpoint.config.password_file, env_files)
            if portable is None:
                log.debug("no quick answer: %s's password comes from the config file itself", endpoint.name)
                return
            stamped.append({"argv": argv, **portable, "expect": expect, "timeout": 60})
        log_dir = self.settings.log_dir or config.core.log_dir
        quick.offer("dbdeck.plugins.sync_prod_to_dev.quick:answer", {
            "lock_dir": str(self.app.lock("sync-prod-to-dev").run_dir), "probes": stamped,
            "lines": [f"source: {self.source.describe()}", f"target: {self.target.describe()}",
                      probes.skip_line(finished_at)],
            "result": {"state_dir": str(config.state_dir), "summary": f"prod unchanged since {finished_at}"},
            "daily_log": str(log_dir) if log_dir else None}, files=config.sources)

    # --- the run ----------------------------------------------------------------------------------
    def run(self):
        started = time.monotonic()
        self.say(f"source: {self.source.describe()}")
        self.say(f"target: {self.target.describe()}")
        prod, dev, databases = self.survey()
        self.check_safety(prod, dev)
        prod_probe, dev_probe = str(prod["probe"]), str(dev["probe"])
        # every run, skip or not, repairs what a run killed mid-swap left (dev closed, staging/old databases)
        if self._clean_leftovers(databases) and not self.runner.dry_run:
            dev_probe = self.dev_probe()
        recipe = self.recipe()
        dev_content = self.dev_content(dev_probe) if self.settings.skip_unchanged and not self.force else None
        last_finished = self.unchanged_since(self.last_sync(), prod_probe, recipe, dev_probe, dev_content)
        if last_finished:
            self.say(probes.skip_line(last_finished))
            self.offer_quick_answer(prod_probe, dev_probe, dev_content, last_finished)
            return {"skipped": True, "last_sync": last_finished}
        self._explain_copy(self.last_sync(), prod_probe, recipe, dev_probe, dev_content)

        # only a run that dumps needs pg_dump; the unchanged case (most runs) spares the check
        self._check_client_tools(int(prod["version"]) // 10000)
        self._create_staging(databases.get(self.dev))
        staging = on_database(self.target, self.staging, "staging")
        try:
            excluded = self._copy_excluded_tables(staging, dev_exists=self.dev in databases)
            self._copy_prod(staging)
            self._anonymize(staging)
            self._swap(dev_exists=self.dev in databases)  # until its commit, dev is as it was
        except BaseException:
            self.say(f"copy failed; dropping {self.staging} (dev is untouched)")
            self._drop(self.staging)
            raise
        if self.dev in databases:
            self._drop(self.old)
        seconds = time.monotonic() - started
        size = None
        if not self.runner.dry_run:
            # the copy's sessions are gone (renaming staging to dev waits for that), and a session flushes
            # its write counters as it exits: dev's fingerprint is settled
            dev_probe = self.dev_probe()
            dev_content = self.dev_content(dev_probe)
            self._record(prod_probe, recipe, dev_probe, dev_content, seconds)
            self.offer_quick_answer(prod_probe, dev_probe, dev_content, self.last_sync()["finished_at"])
            size = self.maintenance.query(sql.SQL("SELECT pg_database_size({}) AS bytes").format(
                sql.Literal(self.dev)))[0]["bytes"]
        self.say(f"sync complete in {seconds:.1f}s" + (f"; kept dev's own {', '.join(excluded)}" if excluded else ""))
        return {"skipped": False, "seconds": round(seconds, 2), "excluded_kept": excluded, "bytes": size}

    def _anonymize(self, staging):
        from . import anonymize
        from .rules import BUILTIN, parse_rules

        rules = parse_rules(self.settings.anonymize)
        if not rules:
            return
        salt = self.settings.anonymize_salt.get_secret_value() if self.settings.anonymize_salt else None
        if salt is None and any(rule in ("hash", "email_mask") for *_, rule, _ in rules):
            raise DbdeckError("anonymize: hash and email_mask need anonymize_salt (or ANONYMIZE_SALT), so the "
                              "hashes cannot be reversed by hashing guesses")
        transformers = {}
        for offered in self.app.plugin_manager.hook.row_transformers():
            for name, function in (offered or {}).items():
                if name in transformers or name in BUILTIN:
                    raise DbdeckError(f"anonymize: two plugins offer a transformer named {name!r}")
                transformers[name] = function
        anonymize.apply(staging, rules, salt, transformers, self.say)

    def _explain_copy(self, last, prod_probe, recipe, dev_probe, dev_content):
        """Say why this run copies when a previous sync exists (a user asking "why did it copy?")."""
        if not last or self.force or not self.settings.skip_unchanged:
            return
        if last.get("recipe") and last.get("recipe") != recipe:
            self.say("the settings that shape dev changed since the last sync (anonymize, exclude_tables, "
                     "keep_owner/keep_privileges or dbdeck's version): copying again")
        elif last.get("dev") and last.get("dev") != dev_probe:
            self.say(f"{self.dev} is not the database the last sync produced (recreated, dropped or replaced): "
                     f"copying again")
        elif last.get("dev") and last.get("dev_content") != dev_content:
            self.say(f"{self.dev} changed since the last sync (writes, schema changes, a restore into it or a "
                     f"restart of its server): copying again")
        elif last.get("prod") != prod_probe:
            self.say("prod changed since the last sync (writes, schema changes or a restart of its server): "
                     "copying")

    def _clean_leftovers(self, databases):
        """Repair what an interrupted run left; whether anything was repaired."""
        repaired = False
        dev = databases.get(self.dev)
        if dev and not dev["datallowconn"]:
            repaired = True
            self.say(f"re-allowing connections to {self.dev} (a previous run stopped mid-swap)")
            self.maintenance.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true")
                                     .format(sql.Identifier(self.dev)))
        for stray in (self.staging, self.old):
            if stray in databases:
                self.say(f"dropping {stray} left by an interrupted run")
                self._drop(stray)
                repaired = True
        return repaired

    def _drop(self, database):
        self.maintenance.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))

    def _create_staging(self, dev_row):
        row = self.source.query("SELECT pg_encoding_to_char(encoding) AS encoding, datcollate, datctype "
                                "FROM pg_database WHERE datname = current_database()")[0]
        statement = sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING {} LC_COLLATE {} LC_CTYPE {}").format(
            sql.Identifier(self.staging), sql.Literal(row["encoding"]), sql.Literal(row["datcollate"]),
            sql.Literal(row["datctype"]))
        if dev_row:
            statement = sql.SQL("{} OWNER {}").format(statement, sql.Identifier(dev_row["owner"]))
        self.say(f"creating {self.staging} beside {self.dev}")
        self.maintenance.execute(statement)

    @property
    def dump_options(self):
        """pg_dump/pg_restore flags for ownership and grants, as configured."""
        return ([] if self.settings.keep_owner else ["--no-owner"]) + \
            ([] if self.settings.keep_privileges else ["--no-privileges"])

    def restore_stage(self, staging):
        return staging.tool_invocation("pg_restore", *self.dump_options, "--exit-on-error", "--single-transaction",
                                       "-d", dbname_argument(self.staging))

    def _copy_excluded_tables(self, staging, dev_exists):
        kept = []
        for table in self.settings.exclude_tables:
            pattern = table_pattern(table)
            in_dev = dev_exists and self._has_table(self.target, table)
            origin = self.target if in_dev else self.source
            if not in_dev and not self._has_table(self.source, table):
                # a typo here would let the table it meant through, rows and all: say so every run
                log.warning("exclude_tables: %s names no table in prod or dev (misspelt? schema-qualify "
                            "names outside public)", table)
                continue
            what = "dev's own copy" if in_dev else "prod's structure, no rows"
            self.say(f"excluded table {table}: keeping {what}")
            dump = ["pg_dump", "-Fc", *self.dump_options, f"--table={pattern}"]
            if not in_dev:
                dump.append("--schema-only")
            self.runner.pipeline([origin.tool_invocation(*dump), self.restore_stage(staging)],
                                 timeout=self.settings.timeout)
            kept.append(table)
        return kept

    def _has_table(self, endpoint, table):
        name = table if "." in table else f"public.{table}"
        rows = endpoint.query(sql.SQL("SELECT to_regclass({}) IS NOT NULL AS present").format(
            sql.Literal(table_pattern(name))))
        return bool(rows and rows[0]["present"])

    def _owned_sequences_of_excluded(self):
        """pg_dump patterns for the sequences an excluded table owns in prod (serial and identity columns):
        the excluded table's own dump brings them, so the main dump must leave them out (restoring them
        twice fails with "relation ..._id_seq already exists")."""
        if not self.settings.exclude_tables:
            return []
        names = [table_pattern(t if "." in t else f"public.{t}") for t in self.settings.exclude_tables]
        rows = self.source.query(sql.SQL(
            "SELECT n.nspname AS schema, s.relname AS name FROM pg_depend d "
            "JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S' JOIN pg_namespace n ON n.oid = s.relnamespace "
            "WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass "
            "AND d.deptype IN ('a', 'i') AND d.refobjid IN "
            "(SELECT r FROM unnest(ARRAY[{}]::text[]) AS t(name), to_regclass(name) AS r WHERE r IS NOT NULL)"
        ).format(sql.SQL(", ").join(sql.Literal(n) for n in names)))
        return ['"' + r["schema"].replace('"', '""') + '"."' + r["name"].replace('"', '""') + '"' for r in rows]

    def _copy_prod(self, staging):
        excluded = [table_pattern(t) for t in self.settings.exclude_tables] + self._owned_sequences_of_excluded()
        dump = ["pg_dump", "-Fc", *self.dump_options, *(f"--exclude-table={p}" for p in excluded)]
        if self.settings.dump_dir:
            self.say(f"copying {self.source.database or 'prod'} into {self.staging} through a dump file")
            self._copy_through_file(dump, staging)
        elif self.source.query("SELECT EXISTS (SELECT 1 FROM pg_largeobject_metadata) AS any")[0]["any"]:
            # large objects are not table data: only pg_dump's archive carries them
            self.say(f"copying {self.source.database or 'prod'} into {self.staging} "
                     f"(one stream: prod has large objects)")
            stages = [self.source.tool_invocation(*dump), self.restore_stage(staging)]
            self._watched(lambda: self.runner.pipeline(stages, timeout=self.settings.timeout),
                          StallWatch(self.settings.stall_timeout, moved=lambda: self._staging_size(),
                                     waiting=StallWatch.staging_waiting(staging)))
        else:
            from .parallel import ParallelCopy

            ParallelCopy(self, staging, self.jobs, self.dump_options, timeout=self.settings.timeout).run(excluded)

    @staticmethod
    def _watched(work, watch):
        """Run work (a copy) while watch checks every 2 s that it still moves; a stall raises and stops
        the copy's programs (run_parallel)."""
        from .parallel import run_parallel

        run_parallel([work], 1, while_waiting=watch.check, interval=2.0)

    def _staging_size(self):
        try:
            return self.maintenance.query(sql.SQL("SELECT pg_database_size({}) AS bytes").format(
                sql.Literal(self.staging)))[0]["bytes"]
        except Exception:  # noqa: BLE001 - a size we cannot read is no progress; the copy reports real failures
            return None

    @property
    def jobs(self):
        return self.settings.jobs or max(2, min(8, os.cpu_count() or 2))

    def _copy_through_file(self, dump, staging):
        """Dump to a temporary name, make it durable, restore staging from it (pg_restore reads every
        entry, so a dump cut short fails here), and only then give it its final name: a file named *.dump
        is always a complete dump that restored once, so pruning never keeps a broken one in place of a
        good one. (pg_restore --list alone would accept a truncated file: the table of contents is
        written at the start.)"""
        directory = Path(self.settings.dump_dir)
        prefix = self.source.database or "prod"
        path = directory / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}.dump"
        partial = path.with_name(path.name + ".partial")
        dump_argv, dump_env = self.source.tool_invocation(*dump)
        restore_argv, restore_env = self.restore_stage(staging)
        if self.runner.dry_run:
            self.runner.say(f"would run: {printable(dump_argv, dump_env)} > {partial}")
            self.runner.say(f"would run: {printable(restore_argv, restore_env)} < {partial}")
            self.runner.say(f"would rename it to {path.name} once restored")
            self._prune_dumps(directory)
            return
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in directory.glob(f"{glob.escape(prefix)}-*.dump.partial"):
            self.say(f"removing {stale.name}, left by an interrupted run")
            stale.unlink(missing_ok=True)
        self.say(f"writing {path}")
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                # pg_dump streams as it reads: a file that stops growing means prod stopped sending
                self._watched(lambda: self.runner.run(dump_argv, env=dump_env, stdout=out,
                                                      timeout=self.settings.timeout),
                              StallWatch(self.settings.stall_timeout, moved=lambda: partial.stat().st_size,
                                         waiting=lambda: True, what="bytes"))
                out.flush()
                os.fsync(out.fileno())
            with open(partial, "rb") as dumped:
                self.runner.run(restore_argv, env=restore_env, stdin=dumped, timeout=self.settings.timeout)
            os.replace(partial, path)
            _fsync_directory(directory)
        except OSError as exc:
            raise DbdeckError(f"could not write the dump {path}: {exc.strerror or exc}") from None
        finally:
            partial.unlink(missing_ok=True)
        self._prune_dumps(directory)

    def _prune_dumps(self, directory):
        """Only complete dumps carry the .dump name (see _copy_through_file), so only those are counted."""
        if not directory.is_dir():
            return
        prefix = glob.escape(self.source.database or "prod")
        dumps = sorted(directory.glob(f"{prefix}-*.dump"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in dumps[self.settings.keep_dumps:]:
            self.say(f"removing old dump {old.name} (keeping the last {self.settings.keep_dumps})")
            if not self.runner.dry_run:
                old.unlink()

    def _terminate_sessions(self, timeout=30):
        """Terminate dev's sessions and wait until they are gone (termination is asynchronous)."""
        sessions = sql.SQL("SELECT count(*) AS n FROM pg_stat_activity WHERE datname = {} AND pid <> pg_backend_pid()"
                           ).format(sql.Literal(self.dev))
        terminate = sql.SQL("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = {} "
                            "AND pid <> pg_backend_pid()").format(sql.Literal(self.dev))
        if self.runner.dry_run:
            self.maintenance.execute(terminate)
            return
        deadline = time.monotonic() + timeout
        while True:
            count = self.maintenance.query(sessions)[0]["n"]
            if not count:
                return
            if time.monotonic() > deadline:
                raise DbdeckError(f"{count} session(s) on {self.dev} did not end within {timeout}s")
            self.maintenance.query(terminate)
            time.sleep(0.1)

    def _swap(self, dev_exists):
        ident = sql.Identifier
        if dev_exists:
            self.say(f"terminating connections to {self.dev}")
            self.maintenance.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(ident(self.dev)))
            try:
                self._terminate_sessions()
                self.say(f"swapping {self.staging} in as {self.dev}")
                faults.point("swap.dev-closed")
                # the commit point: a SIGTERM from here waits for the run's end, moments away (dropping the old
                # copy, recording the sync); before it, a SIGTERM leaves dev as it was and staging dropped
                hold_termination()
                faults.point("swap.committing")
                self.maintenance.execute(sql.SQL("BEGIN; ALTER DATABASE {dev} RENAME TO {old}; "
                                                 "ALTER DATABASE {staging} RENAME TO {dev}; COMMIT").format(
                    dev=ident(self.dev), old=ident(self.old), staging=ident(self.staging)))
            except BaseException:
                self.maintenance.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true")
                                         .format(ident(self.dev)))
                raise
        else:
            self.say(f"renaming {self.staging} to {self.dev} (dev did not exist)")
            hold_termination()
            self.maintenance.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(ident(self.staging),
                                                                                      ident(self.dev)))


def _fsync_directory(directory):
    """Make a rename durable: the directory entry is on disk only once the directory is synced."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
