"""The `local_sync:` section: the main database, the tenants, the table mappings."""

import re
from typing import Literal

from pydantic import NonNegativeInt, PositiveInt, field_validator, model_validator

from dbdeck.config import EndpointConfig, Section

from .tables import BUILTIN_TABLES

# The seed's application reads the main database from DATABASE_URL (Prisma's variable).

INSTANCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MYSQL_IDENTIFIER_MAX = 64


class CaptureDeletes(Section):
    """Record rows deleted from a source table (a trigger writes their keys), so incremental runs see removals."""

    source_table: str
    # target key column -> source table column; by default the same names as the mapping's key
    key_columns: dict[str, str] = {}


class TableMapping(Section):
    """One tenant table fed from a source query on the main database."""

    name: str
    source_query: str | None = None
    ddl: str | None = None
    key: list[str] | None = None
    columns: list[str] | None = None
    watermark: str | None = None
    source_tables: list[str] | None = None
    capture_deletes: CaptureDeletes | None = None
    label: str | None = None
    short_label: str | None = None

    @field_validator("name")
    @classmethod
    def _table_name(cls, value):
        if not value or len(value) > MYSQL_IDENTIFIER_MAX - len("__dbdeck_new"):
            raise ValueError(f"a table name of 1 to {MYSQL_IDENTIFIER_MAX - 12} characters")
        return value

    @model_validator(mode="after")
    def _complete(self):
        builtin = BUILTIN_TABLES.get(self.name, {})
        for field in ("source_query", "ddl", "key", "columns", "watermark", "source_tables", "capture_deletes"):
            if getattr(self, field) is None and field in builtin:
                value = builtin[field]
                setattr(self, field, CaptureDeletes(**value) if field == "capture_deletes" else value)
        if self.source_query is None:
            raise ValueError(f"table {self.name}: give source_query (the SELECT that feeds it)")
        if not self.key:
            raise ValueError(f"table {self.name}: give key (the target table's primary key columns)")
        if self.columns is not None:
            missing = [k for k in self.key if k not in self.columns]
            if missing:
                raise ValueError(f"table {self.name}: key column(s) {', '.join(missing)} not in columns")
        return self

    def labels(self, language):
        """(long, short) label for the log lines: 'setores de contatos' / 'setores'."""
        builtin = BUILTIN_TABLES.get(self.name, {}).get("labels", {}).get(language)
        long = self.label or (builtin[0] if builtin else self.name)
        short = self.short_label or (builtin[1] if builtin and not self.label else long)
        return long, short


class InstanceConfig(Section):
    """A tenant: its name (the source queries' %(instance)s) and its MySQL/MariaDB database."""

    name: str
    target: str | EndpointConfig | None = None

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value):
        if not INSTANCE_NAME.match(value):
            raise ValueError("an instance name is letters, digits, '_', '.', '-' (it names lock files)")
        return value


class WatchSettings(Section):
    debounce_ms: PositiveInt = 200
    # a round runs this often even without notifications (a missed NOTIFY, a trigger not installed)
    fallback_interval_seconds: PositiveInt = 60
    reconnect_seconds: PositiveInt = 5


class LocalSync(Section):
    """Main PostgreSQL -> per-tenant MySQL/MariaDB tables (the seed's LocalSyncService)."""

    source: str | EndpointConfig = EndpointConfig()
    instances: list[InstanceConfig] = []
    # tenants listed by a query on the main database (one name per row), each in its own database
    # on `target_server`, named by `database_pattern`
    instances_query: str | None = None
    target_server: str | EndpointConfig | None = None
    database_pattern: str = "{instance}"
    tables: list[TableMapping] = [TableMapping(name=name) for name in BUILTIN_TABLES]
    language: Literal["pt", "en"] = "pt"
    method: Literal["auto", "load_data", "insert"] = "auto"
    # rows per multi-row REPLACE when LOAD DATA LOCAL is off; a batch wider than the server's
    # max_allowed_packet is split (bench: 10000 beat 2000 and 500 by 10-25%)
    insert_batch_rows: PositiveInt = 10000
    overlap_seconds: NonNegativeInt = 300
    capture_retention_days: PositiveInt = 7
    lock_wait_seconds: PositiveInt = 10
    jobs: PositiveInt = 2
    watch: WatchSettings = WatchSettings()

    @field_validator("tables", "instances", mode="before")
    @classmethod
    def _names(cls, value):
        # `tables: [wpp_contacts, wpp_chats]` keeps only those built-ins with their defaults;
        # `instances: [exatron, acme]` lists tenants on target_server
        return [{"name": v} if isinstance(v, str) else v for v in (value or [])]

    @model_validator(mode="after")
    def _tenants(self):
        names = [t.name for t in self.tables]
        if len(set(names)) != len(names):
            raise ValueError("a table is mapped twice in tables")
        if "{instance}" not in self.database_pattern:
            raise ValueError("database_pattern must contain {instance}")
        seen = set()
        for instance in self.instances:
            if instance.name in seen:
                raise ValueError(f"instance {instance.name} is listed twice")
            seen.add(instance.name)
            if instance.target is None and self.target_server is None:
                raise ValueError(f"instance {instance.name}: give its target, or target_server for all")
        if self.instances_query and self.target_server is None:
            raise ValueError("instances_query needs target_server (the MySQL server holding the tenants' databases)")
        return self
