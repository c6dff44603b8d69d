"""The fast copy of prod into the staging database: parallel COPY streams under one snapshot.

`pg_dump | pg_restore` is one stream: one table at a time, then one index at a time. Here:
1. a psql session on prod opens a REPEATABLE READ transaction and exports its snapshot; every
   other step (pg_dump of the schema, each table's COPY) reads prod through that same snapshot,
   so the copy is exactly as consistent as a single pg_dump;
2. pre-data schema (tables, types, functions, no indexes) restored by pg_restore;
3. table data in `jobs` streams, tables spread over them biggest first: each stream is one
   `psql COPY TO STDOUT | psql COPY FROM STDIN` pair carrying its tables one after another in text
   format, a `\\.` line ending each (one pair of connections per stream, not per table: connection
   set-up and `docker exec` cost more than the copy of a small table). Each table is truncated and
   loaded in one transaction with FREEZE, so the index builds and dev's first readers do not rewrite
   every page to set hint bits; its indexes and primary/unique keys (from pg_dump's plain post-data,
   split at its `-- Name: ...; Type: ...` headers) are built right after, while its pages are cached;
4. sequences set to prod's values;
5. then the keys of partitioned tables and materialized views, foreign keys in `jobs` sessions, and
   the rest (triggers, rules, policies, index attachments, matview refreshes) in dump order.
Works the same for DSN and `docker exec` endpoints: every step is a client-tool invocation.
"""

import json
import re
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from functools import partial

from psycopg import sql

from dbdeck.errors import DbdeckError
from dbdeck.run import printable, stop_children

from .progress import Progress

TABLES_SQL = """
SELECT coalesce(jsonb_agg(jsonb_build_object(
         'name', format('%I.%I', n.nspname, c.relname),
         'bytes', pg_total_relation_size(c.oid),
         'columns', (SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) FROM pg_attribute a
                     WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''))
       ORDER BY pg_total_relation_size(c.oid) DESC), '[]'::jsonb)::text
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND c.relpersistence <> 't'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                  AND d.deptype = 'e')
  AND c.oid <> ALL (EXCLUDED_OIDS)
"""

SEQUENCES_SQL = """
SELECT coalesce(jsonb_agg(jsonb_build_object('name', format('%I.%I', n.nspname, c.relname),
                                             'value', pg_sequence_last_value(c.oid))), '[]'::jsonb)::text
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'S' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                  AND (d.deptype = 'e' OR (d.deptype IN ('a', 'i') AND d.refobjid = ANY (EXCLUDED_OIDS))))
"""

INDEX_TABLES_SQL = """
SELECT coalesce(jsonb_object_agg(format('%s.%s', n.nspname, i.relname), format('%I.%I', n.nspname, t.relname)),
                '{}'::jsonb)::text
FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid
     JOIN pg_namespace n ON n.oid = i.relnamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
"""

RAW_TABLE_NAMES_SQL = """
SELECT coalesce(jsonb_object_agg(format('%s.%s', n.nspname, c.relname), format('%I.%I', n.nspname, c.relname)),
                '{}'::jsonb)::text
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'm', 'f') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
"""

# our sessions build indexes side by side already: parallel workers per build only add overhead
BUILD_SETTINGS = ("SET synchronous_commit = off; SET maintenance_work_mem = '256MB'; "
                  "SET max_parallel_maintenance_workers = 0")

HEADER = re.compile(r"^--\n-- Name: (?P<name>.*?); Type: (?P<type>.*?); Schema: (?P<schema>.*?); Owner: .*?\n--\n",
                    re.MULTILINE)
KEY_CONSTRAINT = re.compile(r"\b(PRIMARY KEY|UNIQUE|EXCLUDE)\b")


def split_post_data(text):
    """pg_dump's plain post-data -> (preamble, [(type, schema, name, sql), ...]) in dump order."""
    matches = list(HEADER.finditer(text))
    if not matches:
        return text, []
    preamble = text[:matches[0].start()]
    entries = []
    for match, following in zip(matches, [*matches[1:], None]):
        body = text[match.end():following.start() if following else len(text)]
        # the last entry carries the dump's trailer (`\unrestrict KEY`), and an index or key is sent with -c
        entries.append((match["type"], match["schema"], match["name"], sql_only(body)))
    return preamble, entries


def constraint_table(schema, name, raw_tables):
    """A CONSTRAINT entry is named 'table constraint' with raw names: find the split naming a table."""
    for position, char in enumerate(name):
        if char == " " and f"{schema}.{name[:position]}" in raw_tables:
            return raw_tables[f"{schema}.{name[:position]}"]
    return None


def group_post_data(entries, index_tables, raw_tables):
    """(index and key SQL per table, foreign keys, everything else in dump order)."""
    per_table, foreign, rest = {}, [], []
    for kind, schema, name, body in entries:
        table = None
        if kind == "INDEX":
            table = index_tables.get(f"{schema}.{name}")
        elif kind == "CONSTRAINT" and KEY_CONSTRAINT.search(body):
            table = constraint_table(schema, name, raw_tables)
        if table:
            per_table.setdefault(table, []).append(body)
        elif kind == "FK CONSTRAINT":
            foreign.append(body)
        else:
            rest.append(body)
    return per_table, foreign, rest


def run_parallel(tasks, workers, while_waiting=None, interval=None):
    """Run the callables `workers` at a time, calling while_waiting every `interval` seconds meanwhile.
    The first failure (or one raised by while_waiting) cancels what has not started, stops the programs
    of what is running, and is raised at once."""
    pool = ThreadPoolExecutor(max_workers=max(1, min(workers, len(tasks))))
    futures = [pool.submit(task) for task in tasks]
    try:
        while True:
            done, pending = wait(futures, timeout=interval, return_when=FIRST_EXCEPTION)
            failed = next((future for future in done if future.exception() is not None), None)
            if failed is not None:
                raise failed.exception()
            if not pending:
                break
            if while_waiting:
                while_waiting()
    except BaseException:
        # the other streams stop now: one blocked reading a frozen prod would never notice on its own
        pool.shutdown(wait=False, cancel_futures=True)
        stop_children()
        raise
    pool.shutdown()


def balance(weighted, workers):
    """Longest first onto the least loaded of `workers` lists (LPT scheduling); empty lists dropped."""
    loads = [[0, []] for _ in range(max(1, workers))]
    for cost, item in sorted(weighted, key=lambda pair: -pair[0]):
        lightest = min(loads, key=lambda load: load[0])
        lightest[0] += cost + 1
        lightest[1].append(item)
    return [items for _, items in loads if items]


def sql_only(script):
    """pg_dump's preamble without psql meta-commands (`\\restrict`): it is sent with -c, as plain SQL."""
    return "\n".join(line for line in script.splitlines() if not line.startswith("\\"))


class StallWatch:
    """Fails a copy from prod that has stopped moving: nothing new for stall_timeout seconds while
    whoever receives is waiting for prod (not building an index, not writing). A frozen or
    unreachable prod keeps TCP open, so without this the wait lasts until `timeout`, hours.

    moved     a value that changes while data arrives (bytes copied, a file's size)
    waiting   True when every receiver waits for prod; called only once the timeout has passed
    """

    # every session loading staging waits for rows from prod (ClientRead), none builds or writes
    STAGING_WAITING_SQL = ("SELECT count(*) AS sessions, count(*) FILTER (WHERE wait_event = 'ClientRead') "
                           "AS waiting FROM pg_stat_activity WHERE datname = current_database() "
                           "AND pid <> pg_backend_pid() AND backend_type = 'client backend'")

    def __init__(self, stall_timeout, moved, waiting, what="rows", clock=time.monotonic):
        self.stall_timeout = stall_timeout
        self.moved = moved
        self.waiting = waiting
        self.what = what
        self.clock = clock
        self._last_moved = clock()
        self._last_seen = None

    @classmethod
    def staging_waiting(cls, staging):
        def waiting():
            try:
                row = staging.query(cls.STAGING_WAITING_SQL)[0]
            except Exception:  # noqa: BLE001 - no answer from staging: its own timeouts report that
                return False
            return bool(row["sessions"]) and row["waiting"] == row["sessions"]
        return waiting

    def check(self, seen=None):
        now = self.clock()
        seen = self.moved() if seen is None else seen
        if seen != self._last_seen:
            self._last_seen, self._last_moved = seen, now
            return
        if not self.stall_timeout or now - self._last_moved < self.stall_timeout:
            return
        if self.waiting():
            raise DbdeckError(f"no {self.what} from prod for {now - self._last_moved:.0f}s while every load waited "
                              f"for them (stall_timeout); prod or the network to it is stalled")
        self._last_moved = now


class CopyWatcher:
    """Tables done and bytes copied so far, from the order of each stream and the staging server's
    pg_stat_progress_copy (PostgreSQL 14+; older servers report whole streams only)."""

    PROGRESS_SQL = ("SELECT format('%I.%I', n.nspname, c.relname) AS name, p.bytes_processed AS bytes "
                    "FROM pg_stat_progress_copy p JOIN pg_class c ON c.oid = p.relid "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE p.datname = current_database()")

    def __init__(self, staging, streams, progress, stall_timeout=0, clock=time.monotonic):
        self.staging = staging
        self.streams = streams
        self.progress = progress
        self.stall = StallWatch(stall_timeout, moved=lambda: None, waiting=StallWatch.staging_waiting(staging),
                                clock=clock)
        self.position = {t["name"]: (i, k) for i, stream in enumerate(streams) for k, t in enumerate(stream)}
        self.reached = [0] * len(streams)  # per stream: tables before this one are done
        self.current_bytes = {}
        self.finished = set()

    def stream_done(self, index):
        self.finished.add(index)
        self.reached[index] = len(self.streams[index])

    def poll(self):
        try:
            rows = self.staging.query(self.PROGRESS_SQL)
        except Exception:  # noqa: BLE001 - progress is best effort; the copy itself reports real failures
            rows = []
        self.current_bytes = {}
        for row in rows:
            if row["name"] in self.position:
                stream, position = self.position[row["name"]]
                if stream not in self.finished:
                    self.reached[stream] = max(self.reached[stream], position)
                    self.current_bytes[row["name"]] = int(row["bytes"] or 0)
        done = [t for i, stream in enumerate(self.streams) for t in stream[:self.reached[i]]]
        sizes = {t["name"]: t["bytes"] for stream in self.streams for t in stream}
        partial = sum(min(copied, sizes[name]) for name, copied in self.current_bytes.items())
        self.progress.update(len(done), sum(t["bytes"] for t in done) + partial)
        self.stall.check((len(done), tuple(sorted(self.current_bytes.items()))))


class ParallelCopy:
    def __init__(self, clone, staging, jobs, dump_options, timeout):
        self.clone = clone
        self.source = clone.source
        self.staging = staging
        self.runner = clone.runner
        self.say = clone.say
        self.jobs = jobs
        self.dump_options = dump_options
        self.timeout = timeout

    def run(self, excluded_patterns):
        excluded_dump = [f"--exclude-table={p}" for p in excluded_patterns]
        argv, env = self.source.tool_invocation("psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1")
        with self.runner.open_session(argv, env=env) as session:
            session.send("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY;\nSELECT pg_export_snapshot();\n")
            snapshot = session.read_line()
            excluded = self._excluded_oids(excluded_patterns)
            tables = json.loads(self._ask(session, TABLES_SQL, excluded))
            sequences = json.loads(self._ask(session, SEQUENCES_SQL, excluded))
            index_tables = json.loads(self._ask(session, INDEX_TABLES_SQL))
            raw_tables = json.loads(self._ask(session, RAW_TABLE_NAMES_SQL))
            dump = ["pg_dump", f"--snapshot={snapshot}", *self.dump_options, *excluded_dump]
            self.say(f"copying the schema of {self.source.database or 'prod'} into {self.clone.staging}")
            self.runner.pipeline([self.source.tool_invocation(*dump, "--section=pre-data", "-Fc"),
                                  self.clone.restore_stage(self.staging)], timeout=self.timeout)
            argv, env = self.source.tool_invocation(*dump, "--section=post-data")
            post_data = self.runner.run(argv, env=env, read_only=True, timeout=self.timeout).stdout
            self.preamble, entries = split_post_data(post_data)
            indexes, foreign, rest = group_post_data(entries, index_tables, raw_tables)
            self._load(tables, indexes, snapshot)
        self._set_sequences(sequences)
        self._finish(indexes, foreign, rest)
        return len(tables)

    def _ask(self, session, query, excluded=""):
        session.send(" ".join(query.replace("EXCLUDED_OIDS", excluded).split()) + ";\n")
        return session.read_line(timeout=self.timeout)

    def _excluded_oids(self, patterns):
        if not patterns:
            return "'{}'::oid[]"
        regclasses = ", ".join(f"to_regclass({sql.Literal(p).as_string(None)})" for p in patterns)
        return f"array_remove(ARRAY[{regclasses}]::oid[], NULL)"

    # --- data, and each table's indexes right after its rows --------------------------------------
    def _load(self, tables, indexes, snapshot):
        if not tables:
            return
        streams = balance([(table["bytes"], table) for table in tables], self.jobs)
        self.say(f"copying {len(tables)} tables in {len(streams)} parallel streams, each table's indexes and keys "
                 f"built right after its rows")
        pipelines = [self._stream(stream, indexes, snapshot) for stream in streams]
        if self.runner.dry_run:
            for pipeline in pipelines:
                self.runner.pipeline(pipeline)
            return
        progress = Progress(self.say, total_items=len(tables), total_bytes=sum(t["bytes"] for t in tables),
                            what="tables")
        watcher = CopyWatcher(self.staging, streams, progress, stall_timeout=self.clone.settings.stall_timeout)
        run_parallel([partial(self._run_stream, pipeline, watcher, index) for index, pipeline in enumerate(pipelines)],
                     len(streams), while_waiting=watcher.poll, interval=2.0)
        progress.finish()

    def _stream(self, tables, indexes, snapshot):
        """One `psql | psql` pair carrying several tables: text COPY streams, each ended by a `\\.` line
        (a data line can never be exactly that: COPY escapes backslashes), so one pair of connections
        serves many tables. Returns the pipeline's two (argv, env) stages."""
        out = ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
               "-c", "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY", "-c", f"SET TRANSACTION SNAPSHOT '{snapshot}'"]
        into = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql_only(self.preamble), "-c", BUILD_SETTINGS]
        for table in tables:
            name, columns = table["name"], f"({table['columns']})" if table["columns"] else ""
            out += ["-c", f"COPY {name} {columns} TO STDOUT", "-c", "SELECT '\\.'"]
            # FREEZE needs the table truncated in the same transaction; it spares every later reader
            # (the index builds first) from rewriting each page to set hint bits
            into += ["-c", "BEGIN", "-c", f"TRUNCATE {name}", "-c", f"COPY {name} {columns} FROM STDIN (FREEZE)",
                     "-c", "COMMIT"]
            for statement in indexes.pop(name, []):
                into += ["-c", statement]
        return [self.source.tool_invocation(*out), self.staging.tool_invocation(*into)]

    def _run_stream(self, pipeline, watcher, index):
        self.runner.pipeline(pipeline, timeout=self.timeout)
        watcher.stream_done(index)

    def _build(self, statements):
        self._psql(self.preamble + BUILD_SETTINGS + ";\n" + "".join(statements))

    def _set_sequences(self, sequences):
        calls = [f"SELECT pg_catalog.setval({sql.Literal(s['name']).as_string(None)}, {int(s['value'])}, true);"
                 for s in sequences if s["value"] is not None]
        if calls:
            self.say(f"setting {len(calls)} sequences to prod's values")
            self._psql("\n".join(calls))

    # --- what needs all tables: keys of partitioned tables and matviews, foreign keys, the rest ---
    def _finish(self, indexes, foreign, rest):
        for label, batches in (("indexes and keys of other relations", list(indexes.values())),
                               ("foreign keys",
                                [foreign[i::self.jobs] for i in range(self.jobs) if foreign[i::self.jobs]])):
            if batches:
                self.say(f"building {label} in {min(self.jobs, len(batches))} sessions")
                run_parallel([partial(self._build, batch) for batch in batches], self.jobs)
        if rest:
            self.say("restoring triggers, rules, policies, comments and materialized view data")
            self._psql(self.preamble + "".join(rest))

    def _psql(self, script):
        argv, env = self.staging.tool_invocation("psql", "-X", "-q", "-v", "ON_ERROR_STOP=1")
        if self.runner.dry_run:
            self.runner.say(f"would run: {printable(argv, env)} <<< {len(script.splitlines())} lines of SQL")
            return
        self.runner.run(argv, env=env, stdin=script, timeout=self.timeout)
