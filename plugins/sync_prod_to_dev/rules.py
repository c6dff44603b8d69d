"""The anonymisation rules as the config gives them, checked when the config loads. Any command run with a
config that sets sync_prod_to_dev validates them, so this module imports no database driver."""

from dbdeck.errors import ConfigError

BUILTIN = ("null", "fixed", "hash", "email_mask", "keep_first_char", "truncate")


def parse_rules(raw):
    """{'customers.email': 'email_mask', 'audit': 'truncate', 't.c': {'rule': 'fixed', 'value': 'x'}}
    -> list of (schema, table, column or None, rule, options)."""
    rules = []
    for key, spec in (raw or {}).items():
        if spec is None:
            spec = {"rule": "null"}
        elif isinstance(spec, str):
            spec = {"rule": spec}
        options = dict(spec)
        rule = options.pop("rule", None)
        if not rule:
            raise ConfigError(f"sync_prod_to_dev.anonymize.{key}: give a rule ({', '.join(BUILTIN)} or a plugin's)")
        parts = key.split(".")
        if rule == "truncate":
            if len(parts) not in (1, 2):
                raise ConfigError(f"sync_prod_to_dev.anonymize.{key}: truncate applies to a table "
                                  f"(table or schema.table)")
            schema, table = (parts if len(parts) == 2 else ["public", parts[0]])
            rules.append((schema, table, None, rule, options))
            continue
        if len(parts) not in (2, 3):
            raise ConfigError(f"sync_prod_to_dev.anonymize.{key}: expected table.column or schema.table.column")
        schema, table, column = parts if len(parts) == 3 else ["public", *parts]
        if rule == "fixed" and "value" not in options:
            raise ConfigError(f"sync_prod_to_dev.anonymize.{key}: rule fixed needs value:")
        rules.append((schema, table, column, rule, options))
    return rules
