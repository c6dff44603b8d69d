"""The `webhook_relay:` section, with the seed's environment variables as overrides."""

from urllib.parse import urlsplit

from pydantic import field_validator

from dbdeck.config import Section


def check_url(value):
    if value is None:
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    return value


def parse_listen(value):
    """'127.0.0.1:8080', ':8080' or '8080' -> (host, port)."""
    host, _, port = str(value).rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:3000), got {value!r}")
    return (host.strip("[]") or "0.0.0.0"), int(port)


class WebhookRelay(Section):
    """Receive each webhook, answer with the primary's response, mirror a copy to dev."""

    listen: str = "127.0.0.1:3080"
    primary: str | None = None
    mirror: str | None = None
    mirror_enabled: bool = True
    mirror_timeout_ms: int = 5000  # the seed's DEV_WEBHOOK_TIMEOUT default
    primary_timeout_s: float = 30.0
    mirror_queue: int = 1000
    mirror_workers: int = 4
    max_body_bytes: int = 10 * 1024 * 1024
    log_dir: str | None = None
    # what the seed mirrors: webhook deliveries (POST). A GET (Meta's hub.challenge verification, a
    # load balancer's probe) is answered by the primary only.
    mirror_methods: list[str] = ["POST"]
    # answered by the relay itself, never forwarded: 200 while it serves (for Docker/systemd/LB checks)
    health_path: str = "/-/relay-health"

    @field_validator("mirror_methods")
    @classmethod
    def _methods(cls, value):
        methods = [m.upper() for m in value]
        unknown = sorted(set(methods) - {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
        if unknown:
            raise ValueError(f"not HTTP methods: {', '.join(unknown)}")
        return methods

    @field_validator("health_path")
    @classmethod
    def _path(cls, value):
        if not value.startswith("/") or any(c.isspace() for c in value):
            raise ValueError("health_path is a URL path starting with /")
        return value

    @field_validator("primary", "mirror")
    @classmethod
    def _url(cls, value):
        return check_url(value)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value):
        parse_listen(value)
        return value

    @field_validator("mirror_timeout_ms", "mirror_queue", "mirror_workers", "max_body_bytes")
    @classmethod
    def _positive(cls, value):
        if value < 1:
            raise ValueError("must be at least 1")
        return value
