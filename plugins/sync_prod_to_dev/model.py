"""The `sync_prod_to_dev:` section, with the seed's environment variables as overrides."""

import re
from pathlib import Path

from pydantic import NonNegativeInt, SecretStr, field_validator

from dbdeck.config import EndpointConfig, Section


class SyncProdToDev(Section):
    """Copy prod into dev: a fresh staging database beside dev, swapped in by rename."""

    source: str | EndpointConfig = EndpointConfig(container="crm-postgres", user="postgres",
                                                  database="crm_production", role="production")
    target: str | EndpointConfig = EndpointConfig(container="crm-postgres-dev", user="postgres",
                                                  database="crm_development", role="development")
    exclude_tables: list[str] = ["_prisma_migrations"]
    log_dir: Path | None = None
    dump_dir: Path | None = None
    keep_dumps: int = 5
    skip_unchanged: bool = True
    allow_production_target: bool = False
    timeout: int = 6 * 3600
    stall_timeout: NonNegativeInt = 600  # no rows from prod this long while the loads wait: fail (0: never)
    jobs: int = 0
    keep_owner: bool = False
    keep_privileges: bool = False
    anonymize: dict[str, str | dict | None] = {}
    anonymize_salt: SecretStr | None = None

    @field_validator("anonymize")
    @classmethod
    def _rules(cls, value):
        from .rules import parse_rules

        parse_rules(value)
        return value

    @field_validator("exclude_tables", mode="before")
    @classmethod
    def _split(cls, value):
        # EXCLUDE_TABLES="_prisma_migrations sensitive_data" or "a,b" (the seed's bash array, flattened)
        if isinstance(value, str):
            value = [v for v in re.split(r"[\s,]+", value) if v]
        return value

    @field_validator("jobs")
    @classmethod
    def _jobs(cls, value):
        if value < 0:
            raise ValueError("jobs must be 0 (one per CPU, 2 to 8) or a positive number of parallel streams")
        return value

    @field_validator("keep_dumps")
    @classmethod
    def _keep(cls, value):
        if value < 1:
            raise ValueError("keep_dumps must be at least 1")
        return value
