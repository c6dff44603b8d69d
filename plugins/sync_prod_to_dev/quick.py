"""When a sync has nothing to do: the probes both paths decide by, and the quick answer (dbdeck.quick).

A sync is skipped only when all of these still hold since the last one: prod's server and change
fingerprint (PROD_PROBE), dev is the very database that sync produced, on the same server, accepting
connections, with no staging/old leftovers (dev_probe), and the recipe (what shapes dev: anonymisation
rules and salt, excluded tables, owner/privilege flags, dbdeck's version) is the same. The full path
(clone.py) compares the same probe answers; a quick answer runs them through psql, without importing
click, pydantic or psycopg. Kept free of those imports on purpose.
"""

import logging
import time

FINGERPRINT_SQL = """
SELECT md5(
  coalesce((SELECT string_agg(relid::text || ':' || n_tup_ins || ':' || n_tup_upd || ':' || n_tup_del, ','
                              ORDER BY relid) FROM pg_stat_user_tables), '')
  || '|' || coalesce((SELECT string_agg(relname || ':' || n_tup_ins || ':' || n_tup_upd || ':' || n_tup_del, ','
                                        ORDER BY relname) FROM pg_stat_sys_tables
                      WHERE relname IN ('pg_largeobject', 'pg_largeobject_metadata')), '')
  || '|' || coalesce((SELECT string_agg(c.oid::text || ':' || c.xmin::text || ':' || c.relfilenode, ','
                                        ORDER BY c.oid)
                      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
                        AND n.nspname NOT LIKE 'pg\\_toast%'), '')
  || '|' || coalesce((SELECT string_agg(p.oid::text || ':' || p.xmin::text, ',' ORDER BY p.oid)
                      FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                      WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')), '')
  || '|' || coalesce((SELECT string_agg(schemaname || '.' || sequencename || ':' || coalesce(last_value::text, '-'),
                                        ',' ORDER BY schemaname, sequencename) FROM pg_sequences), '')
  || '|' || coalesce((SELECT stats_reset::text FROM pg_stat_database WHERE datname = current_database()), '')
)
"""

# prod's server, database and content: one text value, the same through psycopg and psql
PROD_PROBE = ("SELECT (SELECT system_identifier::text FROM pg_control_system()) || ':' || current_database() "
              "|| ':' || (" + FINGERPRINT_SQL.strip() + ")")

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
