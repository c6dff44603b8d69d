"""The `replication:` section: the primary/standby pair, how each node is driven, thresholds."""

import re
from pathlib import Path
from typing import Literal

from pydantic import NonNegativeInt, PositiveFloat, PositiveInt, field_validator, model_validator

from dbdeck.config import EndpointConfig, Section

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|kB|KB|K|MB|M|GB|G|TB|T)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3, "gb": 1024**3,
          "t": 1024**4, "tb": 1024**4}


def parse_size(value):
    """Bytes from 16777216, '16MB', '16 MB' or '512kB' (PostgreSQL's 1024-based units)."""
    if value is None or isinstance(value, int):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"expected a size such as 16MB or 512kB, got {value!r}")
    number, unit = match.groups()
    from decimal import Decimal

    size = int(Decimal(number) * _UNITS[(unit or "").lower()])  # exact: a float would overflow on 400 digits
    if size >= 2**63:
        raise ValueError(f"{value!r} is too large (at most 8 EB)")
    return size


def plain_name(value):
    """A slot or Barman server name: it goes into SQL, Barman's ini file and paths unquoted."""
    if not re.fullmatch(r"[a-z0-9_]{1,63}", value):
        raise ValueError("use only lower-case letters, digits and underscores (at most 63)")
    return value


def role_name(value):
    """A role that also goes into pg_hba.conf and conninfo strings, where quoting rules differ: kept plain."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", value):
        raise ValueError(f"{value!r}: use letters, digits and underscores (starting with a letter)")
    return value


# a DNS name or IPv4 address, or an IPv6 address (in brackets where a port follows)
HOST_PATTERN = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,252})|\[[0-9A-Fa-f:.]+\]"


def node_name(value):
    """A node's name is also a file name (Patroni's <node>.yml), a systemd instance and a server name in
    haproxy.cfg: no path separators, spaces or comment characters."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", value):
        raise ValueError(f"node name {value!r}: use letters, digits, '_', '.' and '-' (starting with a letter or "
                         f"digit, at most 63)")
    return value


def is_host(value):
    """A DNS name, an IPv4 address, or an IPv6 address (bare or in brackets)."""
    return bool(re.fullmatch(HOST_PATTERN, value) or re.fullmatch(r"[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*", value))


def host_only(value):
    """An address to bind or connect to, without a port."""
    if value is not None and not is_host(value):
        raise ValueError(f"{value!r} is not a host name or IP address")
    return value


def tcp_port(value):
    if value is not None and not 0 < value < 65536:
        raise ValueError(f"{value}: a port is between 1 and 65535")
    return value


def host_and_port(value):
    """HOST:PORT (IPv6 in brackets: [::1]:5432)."""
    if value is None:
        return value
    match = re.fullmatch(rf"({HOST_PATTERN}):(\d{{1,5}})", value)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ValueError(f"{value!r}: expected HOST:PORT (an IPv6 address in brackets: [::1]:5432)")
    return value


def format_size(value):
    from dbdeck.output import human_bytes

    return human_bytes(value)


class NodeConfig(Section):
    """One PostgreSQL node: how to reach it with SQL, and the driver that starts/stops it."""

    endpoint: str | EndpointConfig = EndpointConfig(user="postgres", database="postgres")
    driver: Literal["docker", "local", "systemd"] = "local"
    # docker: the container; data_dir is the path inside it (default: the container's $PGDATA)
    container: str | None = None
    # local (pg_ctl) and systemd: the data directory on this host
    data_dir: Path | None = None
    bindir: Path | None = None
    os_user: str | None = None
    unit: str | None = None
    log_file: Path | None = None  # local: pg_ctl's -l (default: <data_dir>.log beside the data directory)
    # host:port the other node streams from (the seed's compose: postgres:5432); default: the endpoint's
    replication_address: str | None = None
    # host:port the applications use in DATABASE_URL for this node (rewritten by promote-replica)
    app_address: str | None = None
    # written to postgresql.auto.conf of a rebuilt data directory (e.g. its own port)
    settings: dict[str, str | int | float | bool] = {}
    # the port answering /primary, /replica... for this node: dbdeck's health server (native pair) or this
    # node's Patroni REST API (manager: patroni); HAProxy checks it
    health_port: int | None = None

    @field_validator("replication_address", "app_address")
    @classmethod
    def _address(cls, value):
        return host_and_port(value)

    @field_validator("health_port")
    @classmethod
    def _port(cls, value):
        return tcp_port(value)

    @model_validator(mode="after")
    def _driver_needs(self):
        if self.driver == "docker" and not self.container:
            raise ValueError("driver docker needs container: NAME")
        if self.driver == "local" and not self.data_dir:
            raise ValueError("driver local needs data_dir: PATH")
        if self.driver == "systemd" and not (self.unit and self.data_dir):
            raise ValueError("driver systemd needs unit: NAME and data_dir: PATH")
        return self


class AfterPromote(Section):
    """What promote-replica --update-connections changes: the seed's 'Atualizando conexoes' steps."""

    env_files: list[Path] = []
    variable: str = "DATABASE_URL"
    compose_file: Path | None = None
    compose_project: str | None = None
    restart_services: list[str] = []


class AutoFailover(Section):
    """auto-failover's detection: a failover after `failures` failed checks `interval` seconds apart."""

    interval: PositiveFloat = 1.0
    failures: PositiveInt = 3
    check_timeout: PositiveFloat = 2.0
    max_lag_bytes: int = 16 * 1024**2
    rejoin: bool = True
    log_file: Path | None = None   # --daemon output; default <log_dir>/auto-failover.log
    pid_file: Path | None = None   # default <run_dir>/auto-failover.pid

    @field_validator("max_lag_bytes", mode="before")
    @classmethod
    def _size(cls, value):
        return parse_size(value)



class Health(Section):
    """Patroni-compatible health endpoints of the native pair, answered by auto-failover and
    check-replication --serve on each node's health_port."""

    listen: str = "127.0.0.1"
    # how HAProxy reaches those ports (the host running auto-failover); default: listen, or 127.0.0.1
    address: str | None = None
    # a probe of the nodes is shared by the checks arriving within this many seconds
    cache_seconds: float = 0.2

    @field_validator("listen", "address")
    @classmethod
    def _host(cls, value):
        return host_only(value)


class HAProxy(Section):
    """`dbdeck haproxy render`: one write port routed to the node whose /primary answers 200, one read
    port balanced over the replicas whose /replica?lag= answers 200."""

    bind: str = "127.0.0.1"
    write_port: int = 5000
    read_port: int | None = 5001
    stats_port: int | None = None
    read_max_lag: int = 16 * 1024**2
    check_interval_ms: PositiveInt = 500   # with fall 2 / rise 1: a new primary is used within about 0.5 s
    check_timeout_ms: PositiveInt = 3000
    config_file: Path = Path("/etc/haproxy/haproxy.cfg")
    max_connections: PositiveInt = 1000

    @field_validator("read_max_lag", mode="before")
    @classmethod
    def _size(cls, value):
        return parse_size(value)

    @field_validator("bind")
    @classmethod
    def _host(cls, value):
        return host_only(value)

    @field_validator("write_port", "read_port", "stats_port")
    @classmethod
    def _port(cls, value):
        return tcp_port(value)


class Patroni(Section):
    """manager: patroni: the nodes run Patroni with etcd; dbdeck renders their configuration and drives
    them through Patroni's REST API (each node's health_port is its restapi port)."""

    scope: str = "dbdeck"
    namespace: str = "/service/"
    etcd_hosts: list[str] = []                 # host:port of etcd's client URLs
    config_dir: Path = Path("/etc/patroni")    # `patroni render` writes <node>.yml, env.conf, haproxy.cfg here
    ttl: PositiveInt = 30
    loop_wait: PositiveInt = 10
    retry_timeout: PositiveInt = 10
    maximum_lag_on_failover: int = 1024**2
    superuser: str = "postgres"
    superuser_password_file: Path | None = None   # default: the nodes' endpoint password
    rewind_user: str = "rewind"
    rewind_password_file: Path | None = None      # default <state_dir>/replication/rewind.password (generated)
    rest_user: str = "dbdeck"
    rest_password_file: Path | None = None        # default <state_dir>/replication/patroni-rest.password
    client_networks: list[str] = []               # pg_hba for applications (through HAProxy: its address)
    parameters: dict[str, str | int | float | bool] = {}   # PostgreSQL settings of every node
    request_timeout: PositiveFloat = 10
    # where Patroni writes its pgpass (for pg_basebackup and pg_rewind): postgresql-common's runtime directory
    pgpass_dir: Path = Path("/run/postgresql")

    @field_validator("maximum_lag_on_failover", mode="before")
    @classmethod
    def _size(cls, value):
        return parse_size(value)

    @field_validator("scope")
    @classmethod
    def _scope(cls, value):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", value):
            raise ValueError("use letters, digits, '_', '.', '-'")
        return value

    @field_validator("superuser", "rewind_user", "rest_user")
    @classmethod
    def _role_name(cls, value):
        return role_name(value)

    @field_validator("etcd_hosts")
    @classmethod
    def _hosts(cls, value):
        for host in value:
            if not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+:\d{1,5}", host):
                raise ValueError(f"{host!r}: expected host:port of an etcd client URL")
        return value


class VerifyCheck(Section):
    """A query run in the restored copy; the restore fails verification when it returns fewer rows or a
    smaller first value than `min` (e.g. SELECT count(*) FROM orders with min: 1)."""

    database: str = "postgres"
    query: str
    min: float = 1


class Backup(Section):
    """Physical backups and point-in-time recovery of the pair's primary, by Barman in streaming mode
    (pg_basebackup through `backup_method = postgres`, pg_receivewal through a replication slot)."""

    # Barman's own files: its configuration (rendered by dbdeck), catalogue, base backups and WAL
    home: Path | None = None            # default <state_dir>/barman
    server: str = "pair"                # the Barman server name
    os_user: str | None = None          # default: barman (Debian's package user) when dbdeck runs as root
    slot: str = "barman"
    retention_policy: str = "RECOVERY WINDOW OF 7 DAYS"
    minimum_redundancy: NonNegativeInt = 1
    bindir: Path | None = None          # PostgreSQL client programs matching the server's major version
    schedule: str = "0 3 * * *"         # the base backup job (cron expression)
    verify_schedule: str = "30 4 * * 0"  # the weekly restore verification
    max_age_hours: PositiveFloat = 26   # dbdeck status: the last backup is stale after this
    verify_max_age_days: PositiveFloat = 8
    restore_dir: Path | None = None     # throwaway clusters of `pitr verify`; default <home>/verify
    checks: list[VerifyCheck] = []
    amcheck: bool = True

    @field_validator("server", "slot")
    @classmethod
    def _plain_name(cls, value):
        return plain_name(value)

    @field_validator("retention_policy")
    @classmethod
    def _retention(cls, value):
        if not re.fullmatch(r"(?i)(REDUNDANCY \d+|RECOVERY WINDOW OF \d+ (DAYS?|WEEKS?|MONTHS?))", value.strip()):
            raise ValueError("expected Barman's 'RECOVERY WINDOW OF 7 DAYS' or 'REDUNDANCY 3'")
        return value.strip().upper()

    @field_validator("schedule", "verify_schedule")
    @classmethod
    def _cron(cls, value):
        from croniter import croniter

        if not croniter.is_valid(value):
            raise ValueError(f"{value!r} is not a cron expression (minute hour day month weekday)")
        return value


class Replication(Section):
    """A PostgreSQL primary + hot standby pair (seed 004's conecta-postgres / conecta-postgres-replica)."""

    # native: dbdeck's commands and auto-failover manage the pair; patroni: Patroni + etcd do (see patroni:)
    manager: Literal["native", "patroni"] = "native"
    nodes: dict[str, NodeConfig] = {}
    primary: str | None = None
    replication_user: str = "replicator"
    replication_password_file: Path | None = None
    slot: str = "replica_slot"
    replication_networks: list[str] = ["127.0.0.1/32"]
    warn_lag_bytes: int | None = 16 * 1024**2
    crit_lag_bytes: int | None = None
    warn_lag_seconds: float | None = None
    crit_lag_seconds: float | None = 30
    log_dir: Path | None = None
    wait_timeout: int = 120
    keep_config_files: list[str] = ["postgresql.conf", "pg_hba.conf", "pg_ident.conf"]
    after_promote: AfterPromote = AfterPromote()
    auto_failover: AutoFailover = AutoFailover()
    switchover_timeout: int = 30
    switchover_max_lag_bytes: int = 16 * 1024**2
    # 'FIRST 1 (*)' makes every commit wait for the standby: a failover then loses no acknowledged commit,
    # at the price of commit latency and of writes blocking while no standby is connected
    synchronous_standby_names: str | None = None
    backup: Backup | None = None
    patroni: Patroni | None = None
    health: Health = Health()
    haproxy: HAProxy = HAProxy()

    @field_validator("warn_lag_bytes", "crit_lag_bytes", "switchover_max_lag_bytes", mode="before")
    @classmethod
    def _size(cls, value):
        return parse_size(value)

    @field_validator("replication_user")
    @classmethod
    def _role_name(cls, value):
        return role_name(value)

    @field_validator("nodes")
    @classmethod
    def _node_names(cls, value):
        for name in value:
            node_name(name)
        return value

    @field_validator("slot")
    @classmethod
    def _slot_name(cls, value):
        return plain_name(value)

    @field_validator("replication_networks")
    @classmethod
    def _networks(cls, value):
        import ipaddress

        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"{network!r} is not an address or CIDR network") from None
        return value

    @model_validator(mode="after")
    def _patroni_needs(self):
        if self.manager != "patroni":
            return self
        if self.patroni is None or not self.patroni.etcd_hosts:
            raise ValueError("manager: patroni needs patroni: {etcd_hosts: [HOST:PORT, ...]}")
        missing = [name for name, node in self.nodes.items() if not node.health_port]
        if missing:
            raise ValueError(f"manager: patroni: nodes {', '.join(missing)} need health_port: the port of "
                             f"their Patroni REST API (e.g. 8008)")
        return self

    @model_validator(mode="after")
    def _health_ports_differ(self):
        # the native pair's health server answers every node's port on one host
        ports = [n.health_port for n in self.nodes.values() if n.health_port]
        if self.manager == "native" and len(ports) != len(set(ports)):
            raise ValueError("nodes: each health_port must be different (one dbdeck process answers them all)")
        return self

    @model_validator(mode="after")
    def _primary_is_a_node(self):
        if self.primary is not None and self.primary not in self.nodes:
            raise ValueError(f"primary: {self.primary!r} is not one of nodes: ({', '.join(self.nodes) or 'none'})")
        return self
