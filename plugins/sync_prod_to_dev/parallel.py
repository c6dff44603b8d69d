"""The fast copy of prod into the staging database: parallel COPY streams under one snapshot.

`pg_dump | pg_restore` is one stream: one table at a time, then one index at a time. Here:
1. a psql session on prod opens a REPEATABLE READ transaction and exports its snapshot; every
   other step (pg_dump of the schema, each table's COPY) reads prod through that same snapshot,
   so the copy is exactly as consistent as a single pg_dump;
2. pre-data schema (tables, types, functions, no indexes) restored by pg_restore;
3. table data as `psql COPY TO STDOUT | psql COPY FROM STDIN` pipelines with kernel pipes, `jobs`
   at a time, biggest first; binary format when both majors match; FREEZE, because the table is
   truncated in the same transaction, so the index builds and dev's first readers do not rewrite
   every page to set hint bits;
4. sequences set to prod's values;
5. post-data from pg_dump's plain output, split at its `-- Name: ...; Type: ...` headers: indexes and
   primary/unique keys built in `jobs` sessions (biggest table first), then foreign keys in `jobs`
   sessions, then the rest (triggers, rules, policies, index attachments, matview refreshes) in
   dump order in one session.
Works the same for DSN and `docker exec` endpoints: every step is a client-tool invocation.
"""

import json
import re
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

from psycopg import sql

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

INDEX_SIZES_SQL = """
SELECT coalesce(jsonb_object_agg(format('%s.%s', n.nspname, i.relname), pg_relation_size(x.indrelid)),
                '{}'::jsonb)::text
FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_namespace n ON n.oid = i.relnamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
"""

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
        entries.append((match["type"], match["schema"], match["name"], body))
    # lines like `\unrestrict KEY` close the preamble's `\restrict KEY`: they belong to the last session
    return preamble, entries


def phases(entries, index_table_bytes):
    """Split post-data entries into (keys and indexes, foreign keys, the rest), the first two with costs."""
    keys, foreign, rest = [], [], []
    for kind, schema, name, body in entries:
        if kind == "INDEX":
            keys.append((index_table_bytes.get(f"{schema}.{name}", 0), body))
        elif kind == "CONSTRAINT" and KEY_CONSTRAINT.search(body):
            table = name.split(" ", 1)[0]
            keys.append((index_table_bytes.get(f"{schema}.{table}", 0), body))
        elif kind == "FK CONSTRAINT":
            foreign.append((0, body))
        else:
            rest.append(body)
    return keys, foreign, rest


def balance(weighted, workers):
    """Longest-first onto the least-loaded of `workers` lists (LPT scheduling)."""
    loads = [[0, []] for _ in range(max(1, workers))]
    for cost, item in sorted(weighted, key=lambda pair: -pair[0]):
        target = min(loads, key=lambda load: load[0])
        target[0] += cost + 1
        target[1].append(item)
    return [items for _, items in loads if items]


class ParallelCopy:
    def __init__(self, clone, staging, jobs, dump_options, binary, timeout):
        self.clone = clone
        self.source = clone.source
        self.staging = staging
        self.runner = clone.runner
        self.say = clone.say
        self.jobs = jobs
        self.dump_options = dump_options
        self.binary = binary
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
            index_table_bytes = json.loads(self._ask(session, INDEX_SIZES_SQL, None))
            dump = ["pg_dump", f"--snapshot={snapshot}", *self.dump_options, *excluded_dump]
            self.say(f"copying the schema of {self.source.database or 'prod'} into {self.clone.staging}")
            self.runner.pipeline([self.source.tool_invocation(*dump, "--section=pre-data", "-Fc"),
                                  self.clone.restore_stage(self.staging)], timeout=self.timeout)
            argv, env = self.source.tool_invocation(*dump, "--section=post-data")
            post_data = self.runner.run(argv, env=env, read_only=True, timeout=self.timeout).stdout
            self._copy_tables(tables, snapshot)
        self._set_sequences(sequences)
        self._post_data(post_data, index_table_bytes)
        return len(tables)

    def _ask(self, session, query, excluded):
        text = query.replace("EXCLUDED_OIDS", excluded or "")
        session.send(" ".join(text.split()) + ";\n")
        return session.read_line(timeout=self.timeout)

    def _excluded_oids(self, patterns):
        if not patterns:
            return "'{}'::oid[]"
        regclasses = ", ".join(f"to_regclass({sql.Literal(p).as_string(None)})" for p in patterns)
        return f"array_remove(ARRAY[{regclasses}]::oid[], NULL)"

    # --- data -------------------------------------------------------------------------------------
    def _copy_tables(self, tables, snapshot):
        if not tables:
            return
        progress = Progress(self.say, total_items=len(tables), total_bytes=sum(t["bytes"] for t in tables),
                            what="tables")
        fmt = "(FORMAT binary)" if self.binary else ""
        self.say(f"copying {len(tables)} tables in {min(self.jobs, len(tables))} parallel streams")

        def copy_one(table):
            name, columns = table["name"], f"({table['columns']})" if table["columns"] else ""
            out = self.source.tool_invocation(
                "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1",
                "-c", "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
                "-c", f"SET TRANSACTION SNAPSHOT '{snapshot}'",
                "-c", f"COPY {name} {columns} TO STDOUT {fmt}")
            freeze = "(FORMAT binary, FREEZE)" if self.binary else "(FREEZE)"
            into = self.staging.tool_invocation(
                "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1",
                "-c", "BEGIN", "-c", "SET LOCAL synchronous_commit = off", "-c", f"TRUNCATE {name}",
                "-c", f"COPY {name} {columns} FROM STDIN {freeze}", "-c", "COMMIT")
            self.runner.pipeline([out, into], timeout=self.timeout)
            progress.advance(table["bytes"])

        if self.runner.dry_run:
            for table in tables:
                copy_one(table)
            return
        self._in_parallel(copy_one, tables)
        progress.finish()

    def _in_parallel(self, function, items):
        """Run function over items, `jobs` at a time; the first failure stops the queue and is raised."""
        executor = ThreadPoolExecutor(max_workers=max(1, min(self.jobs, len(items))))
        futures = [executor.submit(function, item) for item in items]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in futures if f.done() and f.exception() is not None]
        if failed:
            executor.shutdown(wait=False, cancel_futures=True)
            raise failed[0].exception()
        executor.shutdown()

    def _set_sequences(self, sequences):
        calls = [f"SELECT pg_catalog.setval({sql.Literal(s['name']).as_string(None)}, {int(s['value'])}, true);"
                 for s in sequences if s["value"] is not None]
        if calls:
            self.say(f"setting {len(calls)} sequences to prod's values")
            self._psql("\n".join(calls))

    # --- indexes, constraints, the rest --------------------------------------------------------------
    def _post_data(self, text, index_table_bytes):
        if self.runner.dry_run:
            self.runner.say("would build indexes and keys in parallel sessions, then foreign keys, then the rest "
                            "of pg_dump --section=post-data")
            return
        preamble, entries = split_post_data(text)
        keys, foreign, rest = phases(entries, index_table_bytes)
        session_settings = "SET maintenance_work_mem = '256MB';\nSET synchronous_commit = off;\n"
        for label, work in (("indexes and keys", keys), ("foreign keys", foreign)):
            batches = balance(work, self.jobs)
            if batches:
                self.say(f"building {len(work)} {label} in {len(batches)} sessions")
                self._in_parallel(lambda batch: self._psql(preamble + session_settings + "".join(batch)), batches)
        if rest:
            self._psql(preamble + "".join(rest))

    def _psql(self, script):
        argv, env = self.staging.tool_invocation("psql", "-X", "-q", "-v", "ON_ERROR_STOP=1")
        self.runner.run(argv, env=env, stdin=script, timeout=self.timeout)

