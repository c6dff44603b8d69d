"""The host's journal of what dbdeck did: every event passed to the notify hook, one JSON line each.

Failovers, switchovers, promotions, rebuilds, deploys, rollbacks, restores and sync failures all go
through App.notify(), so one append there gives `dbdeck history` everything in time order without each
plugin writing its own file.
"""

import json
import os
import time
from pathlib import Path

from . import output, secrets

FILE = "history.jsonl"


def path_for(config):
    return Path(config.state_dir) / FILE


def append(config, event):
    path = path_for(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"at": output.timestamp(event.at), "ts": round(event.at, 3),
             "kind": event.kind, "severity": event.severity, "message": secrets.mask(event.message),
             "details": secrets.mask_values({k: secrets.MASK if secrets.is_secret_name(str(k)) and v else v
                                             for k, v in event.details.items()})}
    line = json.dumps(entry, default=str) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, line.encode())  # one write with O_APPEND: concurrent writers never interleave a line
    finally:
        os.close(fd)


def read(config, since=None, kinds=(), extra=()):
    """Entries (oldest first) at or after `since` (epoch seconds) whose kind starts with one of kinds;
    `extra` entries (from plugins' history_entries hook) are merged in time order."""
    path = path_for(config)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        lines = []
    entries = []
    for entry in [*(_parse(line) for line in lines), *extra]:
        if entry is None:
            continue  # a line cut by a full disk must not hide the others
        if since is not None and entry.get("ts", 0) < since:
            continue
        if kinds and not any(entry.get("kind", "").startswith(k) for k in kinds):
            continue
        entries.append(entry)
    return sorted(entries, key=lambda e: e.get("ts", 0))


def _parse(line):
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def parse_since(text, now=None):
    """'90m', '12h', '7d' ago, or a date / ISO time -> epoch seconds."""
    import re
    from datetime import datetime

    now = time.time() if now is None else now
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", text)
    if match:
        return now - int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since {text!r}: give a duration like 90m, 12h, 7d or a date/time like 2026-12-01 "
                         f"or 2026-12-01T08:00") from None
    return moment.timestamp()
