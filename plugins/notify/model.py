"""The `notify:` section."""

from typing import Literal

from urllib.parse import urlsplit

from pydantic import PositiveFloat, SecretStr, field_validator

from dbdeck import secrets
from dbdeck.config import Section


class Notify(Section):
    """Where events go. With neither set, events are only logged."""

    webhook_url: SecretStr | None = None  # its path is the credential (Slack, Mattermost, Teams...)
    command: list[str] = []
    min_severity: Literal["info", "warning", "critical"] = "info"
    timeout_s: PositiveFloat = 5.0

    @field_validator("webhook_url", mode="before")
    @classmethod
    def _url(cls, value):
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if value in (None, ""):
            return None
        if not isinstance(value, str) or not value.startswith(("http://", "https://")):
            raise ValueError("expected an http(s) URL (value not shown: it may hold a token)")
        secrets.register(value)  # the path is the token; messages show webhook_shown() instead
        return SecretStr(value)

    def webhook_shown(self):
        """scheme://host/*** for messages."""
        if not self.webhook_url:
            return None
        parts = urlsplit(self.webhook_url.get_secret_value())
        return f"{parts.scheme}://{parts.hostname}/{secrets.MASK}"
