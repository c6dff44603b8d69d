"""The `sync_databases:` section; DATABASE_URL and EXTERNAL_DB_URL (also from .env.sync) as in the seed."""

from pydantic import field_validator

from dbdeck.config import EndpointConfig, Section


class TableSpec(Section):
    """One synced table: its name (optionally schema.table), primary key columns, timestamp column."""

    name: str
    key: list[str] = ["id"]
    timestamp: str = "updated_at"

    @field_validator("key", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("key")
    @classmethod
    def _not_empty(cls, value):
        if not value:
            raise ValueError("give at least one primary key column")
        return value

    @property
    def schema(self):
        return self.name.split(".", 1)[0] if "." in self.name else "public"

    @property
    def table(self):
        return self.name.split(".", 1)[1] if "." in self.name else self.name


class SyncDatabases(Section):
    """Keep tables equal between a local PostgreSQL and an external one (e.g. Neon), both ways."""

    local: str | EndpointConfig = EndpointConfig()
    external: str | EndpointConfig = EndpointConfig()
    tables: list[TableSpec] = [TableSpec(name="perfis")]
    batch_size: int = 10000
    max_round_seconds: int = 240
    tombstone_days: int = 30

    @field_validator("tables", mode="before")
    @classmethod
    def _names(cls, value):
        # `tables: [perfis, public.users]` is short for {name: perfis} with the defaults
        return [{"name": v} if isinstance(v, str) else v for v in (value or [])]

    @field_validator("batch_size", "max_round_seconds", "tombstone_days")
    @classmethod
    def _positive(cls, value):
        if value < 1:
            raise ValueError("must be at least 1")
        return value
