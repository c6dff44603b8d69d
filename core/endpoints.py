"""How to reach a database: by driver (DSN or host/port) and/or by client tools in a container.

An Endpoint answers the questions every command asks: connect, run a client tool (pg_dump,
pg_restore, psql, pg_basebackup, mysql, mysqldump) against it, what server version, is it the same
database as that other endpoint, and how to print it (password masked).

Client tools get their connection settings through libpq/MySQL environment variables, so the
password never appears in argv; for a container the variables are forwarded by name only
(``docker exec -e PGPASSWORD ...`` takes the value from dbdeck's environment).
"""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from . import secrets
from .errors import DbdeckError

if TYPE_CHECKING:
    from .config import EndpointConfig
    from .run import Runner

# libpq connection keywords and the environment variable each one reads
_LIBPQ_ENV = {
    "host": "PGHOST", "hostaddr": "PGHOSTADDR", "port": "PGPORT", "dbname": "PGDATABASE", "user": "PGUSER",
    "password": "PGPASSWORD", "connect_timeout": "PGCONNECT_TIMEOUT", "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT", "sslcert": "PGSSLCERT", "sslkey": "PGSSLKEY", "options": "PGOPTIONS",
    "application_name": "PGAPPNAME", "target_session_attrs": "PGTARGETSESSIONATTRS",
    "channel_binding": "PGCHANNELBINDING", "passfile": "PGPASSFILE", "gssencmode": "PGGSSENCMODE",
}
_POSTGRES_TOOLS = {"psql", "pg_dump", "pg_dumpall", "pg_restore", "pg_basebackup", "pg_isready", "pg_receivewal",
                   "pg_rewind", "createdb", "dropdb", "vacuumdb", "reindexdb", "clusterdb"}
_MYSQL_TOOLS = {"mysql", "mysqldump", "mariadb", "mariadb-dump", "mysqladmin", "mariadb-admin"}


class Endpoint:
    def __init__(self, name: str, config: EndpointConfig, runner: Runner) -> None:
        self.name = name
        self.config = config
        self.runner = runner
        self._params = _connection_params(config)
        secrets.register(self._params.get("password"))

    # --- what it is -----------------------------------------------------------------------------
    @property
    def kind(self):
        return self.config.kind

    @property
    def role(self):
        return self.config.role

    @property
    def container(self):
        return self.config.container

    @property
    def database(self):
        return self._params.get("dbname")

    @property
    def host(self):
        return self._params.get("host")

    @property
    def port(self):
        port = self._params.get("port")
        return int(port) if port else None

    @property
    def password(self):
        return self._params.get("password")

    @property
    def user(self):
        return self._params.get("user")

    @property
    def has_driver_access(self):
        return bool(self.config.dsn is not None or self.config.host)

    def describe(self) -> str:
        """A printable form, password masked: 'prod: postgresql://postgres@127.0.0.1:5432/crm'."""
        p = self._params
        scheme = "postgresql" if self.kind == "postgresql" else "mysql"
        where = ""
        if self.has_driver_access:
            user = f"{p['user']}@" if p.get("user") else ""
            port = f":{p['port']}" if p.get("port") else ""
            where = f"{scheme}://{user}{p.get('host') or ''}{port}/{p.get('dbname') or ''}"
        if self.container:
            inside = f"{p.get('user') or 'default user'}/{p.get('dbname') or 'default database'}"
            where = (where + " " if where else "") + f"container {self.container} ({inside})"
        role = f" [role {self.role}]" if self.role else ""
        return secrets.mask(f"{self.name}: {where or '(local defaults)'}{role}")

    __str__ = describe

    # --- driver access --------------------------------------------------------------------------
    def connect(self, autocommit: bool = True, driver_options: dict[str, Any] | None = None, **overrides: Any) -> Any:
        """A psycopg (3) or pymysql connection; only for endpoints with a DSN or host.

        overrides replace connection parameters (dbname, user...); driver_options go to the driver
        as they are (e.g. pymysql's local_infile).
        """
        if not self.has_driver_access:
            raise DbdeckError(f"endpoint {self.name} is reached only through docker exec (container "
                              f"{self.container}); give it a host/port or dsn for a direct connection")
        params = {**self._params, **overrides}
        try:
            if self.kind == "postgresql":
                import psycopg

                params.setdefault("connect_timeout", self.config.connect_timeout)
                if self.config.lock_timeout:
                    params["options"] = " ".join(filter(None, [params.get("options"),
                                                               f"-c lock_timeout={self.config.lock_timeout}s"]))
                return psycopg.connect(autocommit=autocommit, **params, **(driver_options or {}))
            return self._connect_mysql(params, autocommit, driver_options)
        except Exception as exc:
            if "timed out" in str(exc):
                raise DbdeckError(f"cannot connect to {self.describe()}: the server accepted the connection but did "
                                  f"not answer within {self.config.connect_timeout}s (connect_timeout)") from None
            raise DbdeckError(f"cannot connect to {self.describe()}: {_first_line(exc)}") from None

    def _connect_mysql(self, params, autocommit, driver_options):
        import pymysql

        options = dict(driver_options or {})
        if self.config.lock_timeout:  # metadata locks wait a day (MariaDB) or a year (MySQL) by default
            options.setdefault("init_command", f"SET SESSION lock_wait_timeout = {self.config.lock_timeout}, "
                                               f"innodb_lock_wait_timeout = {self.config.lock_timeout}")
        # the handshake is bounded by connect_timeout (a server that accepts and never answers); each
        # later answer by read_timeout
        connection = pymysql.connect(
            host=params.get("host") or "127.0.0.1", port=int(params.get("port") or 3306),
            user=params.get("user"), password=params.get("password") or "", database=params.get("dbname"),
            connect_timeout=self.config.connect_timeout, read_timeout=self.config.connect_timeout,
            write_timeout=self.config.connect_timeout, autocommit=autocommit, charset="utf8mb4", **options)
        connection._read_timeout = connection._write_timeout = self.config.read_timeout or None
        return connection

    # --- client tools ---------------------------------------------------------------------------
    def tool_invocation(self, tool: str, *args: Any, database: bool = True) -> tuple[list[str], dict[str, str]]:
        """(argv, env) to run a client tool against this endpoint; the env holds the password."""
        if self.kind == "postgresql" and tool not in _POSTGRES_TOOLS:
            raise DbdeckError(f"{tool} is not a PostgreSQL client tool")
        if self.kind == "mysql" and tool not in _MYSQL_TOOLS:
            raise DbdeckError(f"{tool} is not a MySQL/MariaDB client tool")
        env = self._tool_env(database)
        argv = [tool]
        if self.kind == "mysql":
            argv += self._mysql_args(database)
        argv += [str(a) for a in args]
        if self.container:
            prefix = ["docker", "exec", "-i"]
            if self.config.docker_user:
                prefix += ["-u", self.config.docker_user]
            for name in sorted(env):
                prefix += ["-e", name]
            argv = [*prefix, self.container, *argv]
        return argv, env

    def run_tool(self, tool, *args, stdin=None, stdout=None, timeout=None, read_only=False, check=True,
                 database=True):
        argv, env = self.tool_invocation(tool, *args, database=database)
        return self.runner.run(argv, env=env, stdin=stdin, stdout=stdout, timeout=timeout,
                               read_only=read_only, check=check)

    def _tool_env(self, database):
        env = {}
        if self.kind == "postgresql":
            for key, value in self._params.items():
                if key == "dbname" and not database:
                    continue
                if key not in _LIBPQ_ENV:
                    raise DbdeckError(f"endpoint {self.name}: connection option {key!r} has no libpq "
                                      f"environment variable; client tools cannot use it")
                env[_LIBPQ_ENV[key]] = str(value)
            if self.container and not self.has_driver_access:
                env.pop("PGHOST", None)  # inside the container: its own unix socket
        elif self._params.get("password"):
            env["MYSQL_PWD"] = self._params["password"]
        return env

    def _mysql_args(self, database):
        p = self._params
        args = []
        if p.get("host") and not (self.container and not self.has_driver_access):
            args += [f"--host={p['host']}", "--protocol=TCP"]
        if p.get("port"):
            args.append(f"--port={p['port']}")
        if p.get("user"):
            args.append(f"--user={p['user']}")
        if database and p.get("dbname"):
            args.append(f"--database={p['dbname']}")
        return args

    # --- SQL, whichever way the endpoint is reached ---------------------------------------------
    def query(self, sql_text: Any, params: Any = None) -> list[dict[str, Any]]:
        """Run a read-only query and return a list of dicts (also in a dry run)."""
        if self.has_driver_access:
            with self.connect() as conn, self.driver_errors("query"):
                if self.kind == "postgresql":
                    from psycopg.rows import dict_row

                    with conn.cursor(row_factory=dict_row) as cur:
                        cur.execute(sql_text, params)
                        return cur.fetchall() if cur.description else []
                import pymysql.cursors

                with conn.cursor(pymysql.cursors.DictCursor) as cur:
                    cur.execute(sql_text, params)
                    return list(cur.fetchall())
        if params:
            raise DbdeckError("query parameters need a direct connection; compose literals with psycopg.sql")
        return self._query_with_tool(_as_text(sql_text))

    def execute(self, sql_text: Any, params: Any = None, read_only: bool = False) -> Any:
        """Run a statement that changes something; in a dry run it is printed, not run."""
        text = _as_text(sql_text)
        if self.runner.dry_run and not read_only:
            self.runner.say(f"would execute on {self.name}: {text}")
            return
        if self.has_driver_access:
            with self.connect() as conn, self.driver_errors("statement"), conn.cursor() as cur:
                cur.execute(sql_text if self.kind == "postgresql" else text, params)
            return
        if params:
            raise DbdeckError("query parameters need a direct connection; compose literals with psycopg.sql")
        tool = "psql" if self.kind == "postgresql" else "mysql"
        args = ["-X", "-q", "-v", "ON_ERROR_STOP=1"] if tool == "psql" else []
        self.run_tool(tool, *args, stdin=text, read_only=True)

    @contextlib.contextmanager
    def driver_errors(self, what):
        """Driver errors become one masked DbdeckError line naming the endpoint."""
        try:
            yield
        except DbdeckError:
            raise
        except Exception as exc:
            if not _is_driver_error(exc):
                raise
            if self.kind == "mysql" and "timed out" in str(exc):
                raise DbdeckError(f"{what} failed on {self.name}: no answer from the server within "
                                  f"{self.config.read_timeout}s (read_timeout)") from None
            raise DbdeckError(f"{what} failed on {self.name}: {_first_line(exc)}") from None

    def _query_with_tool(self, text):
        if self.kind == "postgresql":
            wrapped = f"SELECT coalesce(json_agg(q), '[]'::json) FROM ({text.rstrip().rstrip(';')}) AS q"
            result = self.run_tool("psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                                   stdin=wrapped, read_only=True)
            return json.loads(result.stdout or "[]")
        result = self.run_tool("mysql", "--batch", "--raw", stdin=text, read_only=True)
        lines = result.stdout.splitlines()
        if not lines:
            return []
        header = lines[0].split("\t")
        return [dict(zip(header, (None if v == "NULL" else v for v in line.split("\t")))) for line in lines[1:]]

    def server_version(self):
        """The server's version string, e.g. '15.18' or '10.11.19-MariaDB'."""
        if self.kind == "postgresql":
            return str(self.query("SELECT current_setting('server_version') AS v")[0]["v"])
        return str(self.query("SELECT VERSION() AS v")[0]["v"])

    def identity(self):
        """What makes two endpoints the same database: (server id, database name)."""
        if self.kind == "postgresql":
            row = self.query("SELECT (SELECT system_identifier::text FROM pg_control_system()) AS server, "
                             "current_database() AS db")[0]
        else:
            # datadir+port identify a server instance on a host; server_uuid is MySQL-only
            row = self.query("SELECT CONCAT(@@hostname, ':', @@port, ':', @@datadir) AS server, DATABASE() AS db")[0]
        return (str(row["server"]), str(row["db"]))

    def ping(self):
        """(ok, detail): whether a trivial query succeeds, and the version or the error."""
        try:
            return True, self.server_version()
        except DbdeckError as exc:
            return False, secrets.mask(str(exc))


def dbname_argument(database: str) -> str:
    """The value for a client tool's -d/--dbname naming exactly this database: libpq reads a -d value
    containing '=' as a whole connection string (DEV_DATABASE='dbname=x host=y' would restore into
    another database or send the password to another server), so it is always given as a quoted
    dbname keyword."""
    return "dbname='" + str(database).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _connection_params(config):
    params = {}
    if config.dsn is not None:
        dsn = config.dsn.get_secret_value()
        params = _parse_mysql_url(dsn) if config.kind == "mysql" else _parse_libpq(dsn)
    for key, field_name in (("host", "host"), ("port", "port"), ("user", "user"), ("dbname", "database")):
        value = getattr(config, field_name)
        if value is not None:
            params[key] = value
    if config.password is not None:
        params["password"] = config.password.get_secret_value()
    params.update(config.options)
    return params


# Prisma's DATABASE_URL carries options of its own that libpq rejects; `schema` becomes the search_path
_PRISMA_ONLY = {"schema", "connection_limit", "pool_timeout", "pgbouncer", "statement_cache_size", "socket_timeout",
                "sslaccept", "sslidentity", "sslpassword"}


def _without_prisma_options(dsn):
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql") or not parts.query:
        return dsn, {}
    from urllib.parse import parse_qsl, urlencode

    kept, extra = [], {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "schema" and value and value != "public":
            extra["options"] = f"-c search_path={value}"
        elif key not in _PRISMA_ONLY:
            kept.append((key, value))
    return parts._replace(query=urlencode(kept)).geturl(), extra


def _parse_libpq(dsn):
    from psycopg.conninfo import conninfo_to_dict

    try:
        dsn, extra = _without_prisma_options(dsn)
        return {**conninfo_to_dict(dsn), **extra}
    except Exception as exc:
        raise DbdeckError(f"malformed PostgreSQL DSN ({secrets.mask(dsn)}): {_first_line(exc)}") from None


def _parse_mysql_url(dsn):
    parts = urlsplit(dsn)
    if parts.scheme not in ("mysql", "mariadb"):
        raise DbdeckError(f"malformed MySQL DSN ({secrets.mask(dsn)}): expected mysql://user:password@host:port/db")
    try:
        port = parts.port
    except ValueError:
        raise DbdeckError(f"malformed MySQL DSN ({secrets.mask(dsn)}): the port is not a number from 1 to "
                          f"65535") from None
    params = {"host": parts.hostname, "port": port, "user": unquote(parts.username or "") or None,
              "password": unquote(parts.password) if parts.password else None,
              "dbname": parts.path.lstrip("/") or None}
    return {k: v for k, v in params.items() if v is not None}


def _as_text(sql_text):
    if isinstance(sql_text, str):
        return sql_text
    return sql_text.as_string(None)  # psycopg.sql.Composable: identifiers and literals already quoted


def _is_driver_error(exc):
    module = type(exc).__module__ or ""
    return module.startswith(("psycopg", "pymysql"))


def _first_line(exc):
    text = str(exc).strip().splitlines()
    return secrets.mask(text[0] if text else type(exc).__name__)
