"""Events passed to the notify hook."""

from dataclasses import dataclass, field
import time


@dataclass(frozen=True)
class Event:
    kind: str          # e.g. "failover.promoted", "deploy.rolled_back", "sync.failed"
    message: str       # one human line, secrets already masked
    severity: str = "info"  # info | warning | critical
    details: dict = field(default_factory=dict)
    at: float = field(default_factory=time.time)
