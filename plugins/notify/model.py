"""The `notify:` section."""

from typing import Literal

from pydantic import PositiveFloat, field_validator

from dbdeck.config import Section


class Notify(Section):
    """Where events go. With neither set, events are only logged."""

    webhook_url: str | None = None
    command: list[str] = []
    min_severity: Literal["info", "warning", "critical"] = "info"
    timeout_s: PositiveFloat = 5.0

    @field_validator("webhook_url")
    @classmethod
    def _url(cls, value):
        if value in (None, ""):
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"expected an http(s) URL, got {value!r}")
        return value
