"""Anonymisation of the staging copy before it becomes dev (the seed's "consider sanitizing").

Rules per `table.column` (or `schema.table.column`), or `truncate` per table:
  null, fixed (value:), hash (deterministic, salted sha256), email_mask (first character + hash of the
  local part, domain kept: deterministic and still unique), keep_first_char, truncate,
  or the name of a transformer offered by a plugin through the row_transformers hook.
Built-in rules run as set-based UPDATEs; the table is then rewritten (VACUUM FULL) so the old values
do not survive as dead tuples in the files that become dev.
"""

from psycopg import sql

from dbdeck.errors import ConfigError, DbdeckError

from .rules import BUILTIN


def _expression(rule, column, options, salt, max_length):
    col = sql.Identifier(column)
    digest = sql.SQL("encode(sha256(convert_to({salt} || {col}::text, 'UTF8')), 'hex')").format(
        salt=sql.Literal(salt), col=col)
    if rule == "null":
        return sql.SQL("NULL")
    if rule == "fixed":
        return sql.Literal(str(options["value"]))
    if rule == "hash":
        value = digest
    elif rule == "email_mask":
        value = sql.SQL("left({col}, 1) || left({digest}, 10) || '@' || "
                        "coalesce(nullif(split_part({col}, '@', 2), ''), 'example.invalid')").format(
                            col=col, digest=digest)
    elif rule == "keep_first_char":
        value = sql.SQL("left({col}, 1) || repeat('*', greatest(length({col}) - 1, 0))").format(col=col)
    else:
        raise DbdeckError(f"unknown rule {rule}")
    if max_length:
        value = sql.SQL("left({}, {})").format(value, sql.Literal(max_length))
    return sql.SQL("CASE WHEN {col} IS NULL THEN NULL ELSE {value} END").format(col=col, value=value)


def apply(staging, rules, salt, transformers, say):
    """Apply the rules to the staging database; any missing table or column is an error (dev untouched)."""
    if not rules:
        return []
    for _, _, _, rule, _ in rules:
        if rule not in BUILTIN and rule not in transformers:
            known = ", ".join([*BUILTIN, *sorted(transformers)])
            raise ConfigError(f"sync_prod_to_dev.anonymize: unknown rule {rule!r} (known: {known})")
    touched = []
    for schema, table, column, rule, options in rules:
        qualified = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))
        found = staging.query(sql.SQL(
            "SELECT a.attname AS col, information_schema._pg_char_max_length(a.atttypid, a.atttypmod) AS max_length "
            "FROM pg_attribute a WHERE a.attrelid = to_regclass({}) AND a.attnum > 0 AND NOT a.attisdropped"
        ).format(sql.Literal(f'"{schema}"."{table}"')))
        if not found:
            raise DbdeckError(f"anonymize: table {schema}.{table} does not exist in the copy; fix the rule")
        columns = {r["col"]: r["max_length"] for r in found}
        if rule == "truncate":
            say(f"anonymize: truncating {schema}.{table}")
            staging.execute(sql.SQL("TRUNCATE {} CASCADE").format(qualified))
            continue
        if column not in columns:
            raise DbdeckError(f"anonymize: column {schema}.{table}.{column} does not exist in the copy; fix the rule")
        say(f"anonymize: {schema}.{table}.{column} -> {rule}")
        if rule in BUILTIN:
            staging.execute(sql.SQL("UPDATE {} SET {} = {}").format(
                qualified, sql.Identifier(column), _expression(rule, column, options, salt, columns[column])))
        else:
            _apply_transformer(staging, qualified, column, transformers[rule], options)
        touched.append(qualified)
    for qualified in dict.fromkeys(t.as_string(None) for t in touched):
        staging.execute(sql.SQL("VACUUM (FULL, ANALYZE) {}").format(sql.SQL(qualified)))
    return [t.as_string(None) for t in touched]


def _apply_transformer(staging, qualified, column, transform, options):
    if staging.runner.dry_run:
        staging.runner.say(f"would transform {qualified.as_string(None)}.{column} row by row")
        return
    with staging.connect(autocommit=False) as conn:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("SELECT ctid::text, {col} FROM {t} WHERE {col} IS NOT NULL").format(
                col=sql.Identifier(column), t=qualified))
            rows = cur.fetchall()
            cur.executemany(sql.SQL("UPDATE {t} SET {col} = %s WHERE ctid = %s::tid").format(
                col=sql.Identifier(column), t=qualified), [(transform(value, **options), ctid) for ctid, value in rows])
        conn.commit()
