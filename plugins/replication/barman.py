"""Barman, driven by dbdeck: its configuration rendered from `replication.backup`, its commands run
through the core Runner as Barman's OS user, its JSON answers read.

Barman keeps its own files under `backup.home`: barman.conf (global), barman.d/<server>.conf, the
pgpass file its libpq connections read (the replication password never goes into a conninfo, so it is
in no argv and no log), the catalogue, base backups and WAL under data/, and dbdeck's own record of what
happened (dbdeck-state.json: last backup, last verification, WAL receiver, pending base backup).
"""

from __future__ import annotations

import json
import logging
import os
import pwd
from datetime import datetime, timezone
from pathlib import Path

from dbdeck.errors import ConfigError, DbdeckError
from dbdeck.state import StateFile, write_atomic

from .pgpass import pgpass_line

log = logging.getLogger("dbdeck.replication")

# Barman's checks that do not mean the WAL chain or the server connection is broken right after set-up
NOT_YET = {"minimum_redundancy_requirements", "backup_maximum_age", "wal_maximum_age"}


def settings_of(pair):
    backup = pair.settings.backup
    if backup is None:
        raise ConfigError(f"{pair.app.config.where()}: replication.backup is not configured: add a "
                          f"`backup:` mapping under `replication:` (see the README's Backups section)")
    return backup


class Barman:
    def __init__(self, pair):
        self.pair = pair
        self.runner = pair.runner
        self.settings = settings_of(pair)
        self.home = Path(self.settings.home or pair.app.config.state_dir / "barman")
        self.config_file = self.home / "barman.conf"
        self.servers_dir = self.home / "barman.d"
        self.passfile = self.home / "pgpass"
        self.data = self.home / "data"
        self.name = self.settings.server
        self.os_user = self.settings.os_user or ("barman" if os.geteuid() == 0 else None)
        self.state = StateFile(self.home / "dbdeck-state.json")
        if self.os_user:
            try:
                pwd.getpwnam(self.os_user)
            except KeyError:
                raise ConfigError(f"replication.backup.os_user: no OS user {self.os_user!r} (Debian's barman "
                                  f"package creates 'barman': apt-get install barman)") from None

    # --- configuration ----------------------------------------------------------------------------
    def render(self, primary, bindir):
        """{path: text} of Barman's files for streaming from primary (a Node)."""
        from psycopg.conninfo import make_conninfo

        host, port = primary.replication_address
        user = self.pair.settings.replication_user
        common = dict(host=host, port=port, user=user, passfile=str(self.passfile), connect_timeout=10)
        settings = self.settings
        server = {
            "description": f"dbdeck replication pair, streaming from {primary.name}",
            "conninfo": make_conninfo(**common, dbname="postgres", application_name="barman"),
            "streaming_conninfo": make_conninfo(**common),
            "backup_method": "postgres",
            "streaming_archiver": "on",
            "slot_name": settings.slot,
            "create_slot": "manual",  # dbdeck creates it reserved: WAL is kept from the slot's creation on
            "immediate_checkpoint": "true",
            "retention_policy": settings.retention_policy,
            "minimum_redundancy": str(settings.minimum_redundancy),
            "path_prefix": str(bindir),
        }
        global_ = {
            "barman_user": self.os_user or pwd.getpwuid(os.geteuid()).pw_name,
            "barman_home": str(self.data),
            "configuration_files_directory": str(self.servers_dir),
            "log_file": str(self.home / "barman.log"),
            "log_level": "INFO",
        }
        for value in (*server.values(), *global_.values()):
            if "%" in value or "\n" in value:  # Barman's ini parser interpolates % and ends values at newlines
                raise ConfigError(f"replication.backup: {value!r} cannot go into Barman's configuration (% or newline)")
        ini = lambda section, items: f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in items.items())  # noqa: E731
        header = "; written by dbdeck from replication.backup: edit dbdeck's YAML, then run `dbdeck pitr setup`\n"
        return {self.config_file: header + ini("barman", global_),
                self.servers_dir / f"{self.name}.conf": header + ini(self.name, server)}

    def write_config(self, primary, bindir, password):
        files = self.render(primary, bindir)
        host, port = primary.replication_address
        files[self.passfile] = pgpass_line(host, port, self.pair.settings.replication_user, password)
        if self.runner.dry_run:
            for path in files:
                self.runner.say(f"would write {path}" + (" (mode 0600)" if path == self.passfile else ""))
            return
        owner = pwd.getpwnam(self.os_user) if self.os_user else None
        for directory in (self.home, self.servers_dir, self.data):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            if owner:
                os.chown(directory, owner.pw_uid, owner.pw_gid)
        # traversable, not listable: the server's OS user reaches the throwaway clusters under verify/
        os.chmod(self.home, 0o711)
        for path, text in files.items():
            write_atomic(path, text, mode=0o600)
            if owner:
                os.chown(path, owner.pw_uid, owner.pw_gid)

    def write_password(self, primary, password):
        """Only the pgpass file (password rotation)."""
        host, port = primary.replication_address
        write_atomic(self.passfile, pgpass_line(host, port, self.pair.settings.replication_user, password),
                     mode=0o600)
        if self.os_user:
            owner = pwd.getpwnam(self.os_user)
            os.chown(self.passfile, owner.pw_uid, owner.pw_gid)

    def configured_host(self):
        """(host, port) the rendered configuration streams from, or None before setup."""
        path = self.servers_dir / f"{self.name}.conf"
        try:
            text = path.read_text()
        except OSError:
            return None
        from psycopg.conninfo import conninfo_to_dict

        for line in text.splitlines():
            if line.startswith("streaming_conninfo = "):
                params = conninfo_to_dict(line.split(" = ", 1)[1])
                return params.get("host"), int(params.get("port") or 5432)
        return None

    @property
    def configured(self):
        return self.config_file.exists()

    # --- running Barman ----------------------------------------------------------------------------
    def run(self, *args, as_json=False, check=True, timeout=None, read_only=False):
        if not self.configured and not self.runner.dry_run:
            raise DbdeckError(f"Barman is not set up yet ({self.config_file} missing): run `dbdeck pitr setup`")
        argv = ["barman", "-c", self.config_file, *(["-f", "json"] if as_json else []), *args]
        try:
            # Barman's connections authenticate with its own pgpass: a PGPASSWORD in the caller's environment
            # (an operator's shell, a CI job) would win over it, and libpq reads an empty one as unset
            result = self.runner.run(argv, as_user=self.os_user, check=check, timeout=timeout, read_only=read_only,
                                     cwd="/", env={"PGPASSWORD": ""})
        except FileNotFoundError:
            raise DbdeckError("barman is not installed (Debian: apt-get install barman)") from None
        if as_json and not result.dry_run:
            try:
                return json.loads(result.stdout or "{}")
            except ValueError:
                raise DbdeckError(f"barman {args[0]} did not answer JSON: {(result.stdout or '')[:200]}") from None
        return result

    def checks(self):
        """{check name: (ok, hint)} from `barman check`."""
        answer = self.run("check", self.name, as_json=True, check=False, read_only=True, timeout=120)
        server = answer.get(self.name) or {}
        return {name: (value.get("status") == "OK", value.get("hint", "")) for name, value in server.items()}

    def backups(self):
        """Base backups, oldest first: Barman's JSON rows (end_time_timestamp in epoch seconds, size_bytes)."""
        answer = self.run("list-backups", self.name, as_json=True, read_only=True, timeout=60)
        return sorted(answer.get(self.name) or [], key=lambda entry: entry["backup_id"])

    def show(self, backup_id):
        answer = self.run("show-backup", self.name, backup_id, as_json=True, read_only=True, timeout=60)
        return answer.get(self.name) or {}

    def archive_now(self):
        """Move what pg_receivewal finished into the WAL archive (what `barman cron` does each minute)."""
        self.run("archive-wal", self.name, timeout=300)

    def start_receiver(self):
        """`barman cron`: starts pg_receivewal when it is not running, archives WAL, applies retention."""
        self.run("cron", timeout=600)

    def stop_receiver(self):
        self.run("receive-wal", "--stop", self.name, check=False, timeout=60)

    def wal_files(self):
        """Archived WAL segment names (the archive's index, xlog.db), in order."""
        index = self.data / self.name / "wals" / "xlog.db"
        try:
            return [line.split("\t", 1)[0] for line in index.read_text().splitlines() if line.strip()]
        except OSError:
            return []

    def received(self, segment):
        """pg_receivewal has closed segment: it waits in the streaming directory for `barman archive-wal`."""
        streaming = self.data / self.name / "streaming"
        return any(not found.name.endswith(".partial") for found in streaming.glob(f"{segment}*"))

    def streaming_partial(self):
        """The segment pg_receivewal is writing (name.partial), or None."""
        found = sorted((self.data / self.name / "streaming").glob("*.partial"))
        return found[-1] if found else None


def parse_time(value):
    """An aware datetime from Barman's JSON (an epoch string) or an ISO 8601 text."""
    if value is None:
        return None
    text = str(value)
    if text.isdigit():
        return datetime.fromtimestamp(int(text), tz=timezone.utc)
    return datetime.fromisoformat(text)
