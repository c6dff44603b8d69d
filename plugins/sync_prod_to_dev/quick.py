"""When a sync has nothing to do: the probes both paths decide by, and the quick answer (dbdeck.quick).

A sync is skipped only when all of these still hold since the last one: prod's server and change
fingerprint (PROD_PROBE), dev is the very database that sync produced, on the same server, accepting
connections, with no staging/old leftovers (dev_probe), dev's own fingerprint (the same digest over
dev, its excluded tables aside: a developer's write or DDL, a dump restored into it), and the recipe
(what shapes dev: anonymisation rules and salt, excluded tables, owner/privilege flags, dbdeck's
version) is the same. The full path
(clone.py) compares the same probe answers; a quick answer runs them through psql, without importing
click, pydantic or psycopg. Kept free of those imports on purpose.
"""

import logging
import time

# The schemas a database's own objects live in (not the system's, not a session's temporary ones).
_OWN = ("nspname NOT IN ('pg_catalog', 'information_schema') AND nspname !~ '^pg_(toast|temp_|toast_temp_)'")

# Every catalog that describes a database's own objects, as (catalog, row key, which rows). Each row's
# xmin changes with any ALTER, RENAME, COMMENT, GRANT, VALIDATE... of it, and a created or dropped object
# adds or removes rows, so any DDL changes the digest; VACUUM and ANALYZE update catalog rows in place
# and leave it alone.
_CATALOGS = [
    ("pg_namespace", "oid::text", "oid IN (SELECT oid FROM own_ns)"),
    ("pg_class", "oid::text || '/' || relfilenode", "relnamespace IN (SELECT oid FROM own_ns)"),
    ("pg_attribute", "attrelid::text || '.' || attnum", "attrelid IN (SELECT oid FROM own_rel)"),
    ("pg_attrdef", "oid::text", "adrelid IN (SELECT oid FROM own_rel)"),
    ("pg_constraint", "oid::text", "connamespace IN (SELECT oid FROM own_ns)"),
    ("pg_index", "indexrelid::text", "indrelid IN (SELECT oid FROM own_rel)"),
    ("pg_trigger", "oid::text", "tgrelid IN (SELECT oid FROM own_rel)"),
    ("pg_rewrite", "oid::text", "ev_class IN (SELECT oid FROM own_rel)"),
    ("pg_policy", "oid::text", "polrelid IN (SELECT oid FROM own_rel)"),
    ("pg_inherits", "inhrelid::text || '<' || inhparent", "inhrelid IN (SELECT oid FROM own_rel)"),
    ("pg_sequence", "seqrelid::text", "seqrelid IN (SELECT oid FROM own_rel)"),
    ("pg_type", "oid::text", "typnamespace IN (SELECT oid FROM own_ns)"),
    ("pg_enum", "oid::text", "enumtypid IN (SELECT oid FROM pg_type WHERE typnamespace IN (SELECT oid FROM own_ns))"),
    ("pg_proc", "oid::text", "pronamespace IN (SELECT oid FROM own_ns)"),
    ("pg_operator", "oid::text", "oprnamespace IN (SELECT oid FROM own_ns)"),
    ("pg_collation", "oid::text", "collnamespace IN (SELECT oid FROM own_ns)"),
    ("pg_statistic_ext", "oid::text", "stxnamespace IN (SELECT oid FROM own_ns)"),
    ("pg_extension", "oid::text", "true"),
    ("pg_default_acl", "oid::text", "true"),
    ("pg_event_trigger", "oid::text", "true"),
    ("pg_publication", "oid::text", "true"),
    ("pg_publication_rel", "oid::text", "true"),
    # comments: on any object a user made (the first 16384 object ids are the system's own)
    ("pg_description", "classoid::text || '.' || objoid || '.' || objsubid", "objoid >= 16384"),
]


def _catalog_digest(catalog, key, rows):
    return (f"coalesce((SELECT md5(string_agg({key} || ':' || xmin::text, ',' ORDER BY {key})) FROM {catalog} "
            f"WHERE {rows}), '')")


def fingerprint_sql(excluded_literals=""):
    """One md5 over a database's content counters, every catalog row of its own objects, its sequences'
    positions and large objects, and when its server started and its statistics were reset: it changes
    with any committed write or DDL there, and with a restart (a crash discards the counters, so a restart
    cannot be told from no change). excluded_literals: SQL text literals naming tables left out (dev's own
    tables, which dev keeps across syncs)."""
    excluded = (f"(SELECT r FROM unnest(ARRAY[{excluded_literals}]::text[]) AS t(name), to_regclass(name) AS r "
                f"WHERE r IS NOT NULL)")
    leave_out = f" AND relid NOT IN {excluded}" if excluded_literals else ""
    # an excluded table's serial/identity sequence moves with dev's own writes to it
    sequences_left_out = (f" WHERE format('%I.%I', schemaname, sequencename)::regclass NOT IN (SELECT objid FROM "
                          f"pg_depend WHERE classid = 'pg_class'::regclass AND deptype IN ('a', 'i') AND refobjid IN "
                          f"{excluded})") if excluded_literals else ""
    parts = [
        "(SELECT string_agg(relid::text || ':' || n_tup_ins || ':' || n_tup_upd || ':' || n_tup_del, ',' "
        f"ORDER BY relid) FROM pg_stat_all_tables WHERE relid IN (SELECT oid FROM own_rel){leave_out})",
        "(SELECT string_agg(relname || ':' || n_tup_ins || ':' || n_tup_upd || ':' || n_tup_del, ',' "
        "ORDER BY relname) FROM pg_stat_sys_tables WHERE relname IN ('pg_largeobject', 'pg_largeobject_metadata'))",
        "(SELECT string_agg(schemaname || '.' || sequencename || ':' || coalesce(last_value::text, '-'), ',' "
        "ORDER BY schemaname, sequencename) FROM pg_sequences" + sequences_left_out + ")",
        *(_catalog_digest(*entry) for entry in _CATALOGS),
        "(SELECT stats_reset::text FROM pg_stat_database WHERE datname = current_database())",
        "pg_postmaster_start_time()::text",
    ]
    return ("WITH own_ns AS (SELECT oid FROM pg_namespace WHERE " + _OWN + "), "
            "own_rel AS (SELECT oid FROM pg_class WHERE relnamespace IN (SELECT oid FROM own_ns)) "
            "SELECT md5(concat_ws('|', " + ", ".join(f"coalesce({p}, '')" for p in parts) + "))")


FINGERPRINT_SQL = fingerprint_sql()

# prod's server, database and content: one text value, the same through psycopg and psql
PROD_PROBE = ("SELECT (SELECT system_identifier::text FROM pg_control_system()) || ':' || current_database() "
              "|| ':' || (" + FINGERPRINT_SQL + ")")

DEV_PROBE_TEMPLATE = (
    "SELECT (SELECT system_identifier::text FROM pg_control_system()) || ':' || "
    "coalesce((SELECT oid::text || CASE WHEN datallowconn THEN '' ELSE '-closed' END FROM pg_database "
    "WHERE datname = {dev}), 'missing') || ':' || "
    "(SELECT count(*) FROM pg_database WHERE datname IN ({staging}, {old}))::text || '-leftovers'")


def skip_line(last_finished):
    return f"prod unchanged since the last sync at {last_finished}; nothing to do (--force to copy anyway)"


def dev_is_sound(answer):
    """A dev probe answer for a dev that exists, accepts connections and has no leftovers beside it."""
    server, database, leftovers = answer.split(":")
    return database.isdigit() and leftovers == "0-leftovers"


def answer(data, say):
    """Quick answer for a sync whose stamp still holds: 0 after the same bookkeeping a skipped run
    does, or None when any probe answers differently (the full path decides and repairs)."""
    from dbdeck.errors import LockBusy
    from dbdeck.lock import JobLock

    started = time.monotonic()
    lock = JobLock("sync-prod-to-dev", data["lock_dir"])
    try:
        lock.acquire()
    except LockBusy:
        return None
    try:
        from dbdeck.run import Runner

        runner = Runner()
        from dbdeck import quick

        probes = data["probes"]
        results = runner.probe([(p["argv"], quick.resolve_env(p)) for p in probes],
                               timeout=max(p["timeout"] for p in probes))
        if any(r.returncode != 0 or r.stdout.strip() != p["expect"] for p, r in zip(probes, results)):
            return None
        if data.get("daily_log"):
            from dbdeck import log as log_module

            log_module.add_daily_file(data["daily_log"], "sync")
        logger = logging.getLogger("dbdeck.sync_prod_to_dev")
        for line in data["lines"]:
            logger.info(line)
            say(line)
        from dbdeck.status import record_result_in

        result = data["result"]
        record_result_in(result["state_dir"], "sync-prod-to-dev", "sync", True, result["summary"],
                         round(time.monotonic() - started, 2), copied=False)
        return 0
    finally:
        lock.release()
