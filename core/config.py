"""Configuration: YAML file, ${VAR} interpolation, .env files, environment overrides, validation.

Search order: --config, $DBDECK_CONFIG, ./etc/dbdeck.yaml, /etc/dbdeck/dbdeck.yaml. With no file
found, every section takes its defaults (and the seeds' environment variables still apply).

Each plugin declares its top-level section through the config_section hook: a pydantic model
(unknown keys rejected) and the environment variables that override keys in it. Every error
names the file, the line, the key and what was expected, and is raised before anything runs.
"""

import functools
import importlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError, field_validator, model_validator

from . import quick, secrets
from .errors import ConfigError

SEARCH_PATHS = (Path("etc/dbdeck.yaml"), Path("/etc/dbdeck/dbdeck.yaml"))
_SECRET_KEY_HINTS = ("password", "secret", "token", "dsn", "url")
# ${NAME}, ${NAME:-default} where the default may itself hold ${OTHER} or ${OTHER:-x}, and $$ for a literal $
_INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
                            r"(?::-(?P<default>(?:[^${}]|\$\$|\$\{[A-Za-z_][A-Za-z0-9_]*(?::-[^${}]*)?\}|\$(?![{$]))*))?"
                            r"\}|\$\$")
_MAX_YAML_NODES = 20000  # a config is a few hundred; aliases that expand past this are a bomb, not a config


class Section(BaseModel):
    """Base for every configuration section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_default=True, defer_build=True)


@dataclass(frozen=True)
class ConfigSection:
    """What a plugin returns from config_section(): its key, its model, and its env overrides.

    env maps an environment variable to a dotted key inside the section, e.g.
    {"PROD_DB_CONTAINER": "source.container"}; a set variable overrides the YAML value.
    """

    name: str
    model: type | str
    env: dict = field(default_factory=dict)
    description: str = ""

    def model_class(self) -> type:
        """The model, imported on first use when given as "package.module:Class": a command reads one or two
        sections, and importing every plugin's model (pydantic builds each class) is much of a start-up."""
        return _imported(self.model) if isinstance(self.model, str) else self.model


@functools.lru_cache(maxsize=None)
def _imported(reference):
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


class EndpointConfig(Section):
    """How to reach one database: a DSN, host/port, and/or a Docker container for client tools."""

    kind: Literal["postgresql", "mysql"] = "postgresql"
    dsn: SecretStr | None = None
    host: str | None = None
    port: int | None = None
    user: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    database: str | None = None
    container: str | None = None
    docker_user: str | None = None
    role: Literal["production", "staging", "development", "test", "sandbox"] | None = None
    connect_timeout: int = 10
    read_timeout: int = 900  # MySQL: longest wait for one answer of a connected server (0: no limit)
    lock_timeout: int = 300  # longest wait for a lock another session holds (0: the server's default)
    options: dict[str, str] = {}

    @model_validator(mode="after")
    def _one_way_to_each_thing(self):
        if self.dsn is not None and self.host is not None:
            raise ValueError("give either dsn or host/port, not both")
        if self.password is not None and self.password_file is not None:
            raise ValueError("give either password or password_file, not both")
        if self.password_file is not None:
            self.password = SecretStr(_read_secret_file(self.password_file))
            self.password_file = self.password_file
        for value in (self.password, self.dsn):
            secrets.register(value)
        return self

    @field_validator("container", "docker_user")
    @classmethod
    def _docker_name(cls, value):
        # docker's own rule for names; anything else (e.g. "--help") would be read as a docker option
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]*", value):
            raise ValueError(f"{value!r} is not a container or user name docker accepts (letters, digits, "
                             f"'_', '.', '-'; starting with a letter or digit)")
        return value

    @field_validator("password_file")
    @classmethod
    def _password_file_protected(cls, value):
        if value is None:
            return value
        import logging
        import stat

        if not _read_secret_file(value):
            raise ValueError(f"password file {value} is empty")
        mode = os.stat(value).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            logging.getLogger("dbdeck.config").warning(
                "password file %s can be read by others (mode %s); chmod 600 it", value, oct(mode & 0o777))
        return value

    @field_validator("port")
    @classmethod
    def _port_range(cls, value):
        if value is not None and not 0 < value < 65536:
            raise ValueError("port must be between 1 and 65535")
        return value

    @field_validator("host")
    @classmethod
    def _host_is_one_word(cls, value):
        # a host name, an address, a list of them (libpq's h1,h2) or a socket directory: never spaces, quotes,
        # '#' or control characters, which would end a line or start a comment in a file rendered from it
        if value is not None and not re.fullmatch(r"[^\s#'\"\\]+", value):
            raise ValueError(f"{value!r} is not a host name, address or socket directory")
        return value


class CoreSettings(Section):
    """The `dbdeck:` section: settings shared by every command."""

    run_dir: Path | None = None
    log_dir: Path | None = None
    state_dir: Path | None = None
    env_files: list[Path] = []


def _read_secret_file(path):
    try:
        return Path(path).read_text().rstrip("\r\n")
    except OSError as exc:
        raise ValueError(f"cannot read password file {path}: {exc.strerror}") from None


CORE_SECTIONS = (
    ConfigSection("dbdeck", CoreSettings, description="settings shared by every command"),
)


def default_state_dir():
    if os.geteuid() == 0:
        return Path("/var/lib/dbdeck")
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "dbdeck"


class Config:
    """The validated configuration: one model instance per section."""

    def __init__(self, path, sections, endpoints, given=(), shell_overrides=(), sources=None, defaults=None):
        self.path = path
        self.sources = dict(sources or {})  # {file: digest} of every file the settings were read from
        self._sections = sections
        # {name: ConfigSection} of the sections left to their defaults. Importing and building a section's model
        # is much of a command's start-up; a command reads one or two sections, so the rest are never built.
        self._defaults = dict(defaults or {})
        self.endpoints = endpoints
        self._given = frozenset(given)
        self.shell_overrides = tuple(shell_overrides)

    def given(self, name):
        """Whether the section was written in the file or set by one of its environment variables (rather
        than all defaults): plugins offer default scheduled jobs only for what the user set up."""
        return name in self._given

    @property
    def core(self):
        return self.section("dbdeck")

    @property
    def state_dir(self):
        """Where commands keep state between runs (last sync, last scheduled run...)."""
        return Path(self.core.state_dir) if self.core.state_dir else default_state_dir()

    def section(self, name):
        if name in self._defaults:
            self._sections[name] = self._defaults.pop(name).model_class().model_validate({})
        return self._sections[name]

    def sections(self):
        return {name: self.section(name) for name in self._sections}

    def endpoint_config(self, name):
        if name not in self.endpoints:
            known = ", ".join(sorted(self.endpoints)) or "none"
            raise ConfigError(f"{self.where()}: no endpoint named {name!r} under endpoints: (known: {known})")
        return self.endpoints[name]

    def where(self):
        return str(self.path) if self.path else "(no config file)"


def find_config_file(explicit=None, environ=None):
    """The config file to use, or None when none exists (defaults only); explicit=False: none, no search
    (`--no-config`, what a job installed without a config file runs with)."""
    environ = os.environ if environ is None else environ
    if explicit is False:
        return None
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found (given with --config)")
        return path
    if environ.get("DBDECK_CONFIG"):
        path = Path(environ["DBDECK_CONFIG"])
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found (given by $DBDECK_CONFIG)")
        return path
    for path in SEARCH_PATHS:
        if path.is_file():
            return path
    return None


def load(explicit=None, sections=(), environ=None):
    """Find, read, interpolate, override and validate. Raises ConfigError with file:line: key: problem."""
    environ = dict(os.environ if environ is None else environ)
    path = find_config_file(explicit, environ)
    sources: dict[str, str] = {}
    raw, lines = _read_yaml(path, sources) if path else ({}, {})
    where = _Where(path, lines)

    all_sections = {s.name: s for s in (*CORE_SECTIONS, *sections)}
    all_sections.setdefault("endpoints", None)
    unknown = sorted(set(raw) - set(all_sections))
    if unknown:
        known = ", ".join(sorted(all_sections))
        raise ConfigError(f"{where.at((unknown[0],))}: unknown section {unknown[0]!r} (expected one of: {known})")

    env_files = (raw.get("dbdeck") or {}).get("env_files") or []
    shell = environ
    environ = _with_env_files(env_files, path, environ, where, sources)
    raw = _interpolate(raw, environ, where, ())

    if path is not None:
        raw = _anchor_local_files(raw, path.parent)
    given = {name for name, value in raw.items() if value not in (None, {})}
    shell_overrides = []
    for spec in all_sections.values():
        if spec is None:
            continue
        for variable, dotted in spec.env.items():
            if environ.get(variable) not in (None, ""):
                _set_dotted(raw, (spec.name, *dotted.split(".")), environ[variable],
                            lambda key_path, current, spec=spec: _override_base(raw, spec, key_path, current))
                given.add(spec.name)
                if shell.get(variable) not in (None, ""):
                    shell_overrides.append(variable)

    # every section and endpoint is checked, and every problem is reported (one line each), in the
    # file's order: fixing a config should not take one run per mistake
    problems = []

    def checked(model, value, key_path):
        try:
            return _validate(model, value, key_path, where)
        except ConfigError as exc:
            problems.extend(str(exc).splitlines())
            return None

    validated: dict[str, Any] = {}
    defaults: dict[str, ConfigSection] = {}
    for name, spec in all_sections.items():
        if spec is None:
            continue
        value = raw.get(name)
        if value in (None, {}) and name not in given:
            validated[name], defaults[name] = None, spec  # all defaults, which cannot fail: built when read
            continue
        if value is None:
            value = {}
        if not isinstance(value, dict):
            problems.append(f"{where.at((name,))}: {name}: expected a mapping of settings, got {_kind(value)}")
            continue
        validated[name] = checked(spec.model_class(), value, (name,))

    endpoints_raw = raw.get("endpoints") or {}
    endpoints = {}
    if not isinstance(endpoints_raw, dict):
        problems.append(f"{where.at(('endpoints',))}: endpoints: expected a mapping of name -> endpoint, "
                        f"got {_kind(endpoints_raw)}")
        endpoints_raw = {}
    for name, value in endpoints_raw.items():
        if not isinstance(value, dict):
            problems.append(f"{where.at(('endpoints', name))}: endpoints.{name}: expected a mapping "
                            f"(dsn/host/container/...), got {_kind(value)}")
            continue
        endpoints[name] = checked(EndpointConfig, value, ("endpoints", name))
    if problems:
        raise ConfigError("\n".join(sorted(dict.fromkeys(problems), key=_line_of)))
    return Config(path, validated, endpoints, given, shell_overrides, sources, defaults)


def _line_of(problem):
    """Sort key: a problem's line in the file ('path:12: ...'), problems without one last."""
    match = re.match(r"^.*?:(\d+): ", problem)
    return int(match.group(1)) if match else 1 << 30


def validate_model(model, value, key_path, where=None):
    """Validate one value (e.g. an inline endpoint inside a plugin section) with the same error style."""
    return _validate(model, value, tuple(key_path), where or _Where(None, {}))


class _Where:
    def __init__(self, path, lines):
        self.path = path
        self.lines = lines

    def at(self, key_path):
        line = None
        for depth in range(len(key_path), 0, -1):
            line = self.lines.get(tuple(str(k) for k in key_path[:depth]))
            if line is not None:
                break
        name = str(self.path) if self.path else "(environment)"
        return f"{name}:{line}" if line is not None else name


def _read_yaml(path, sources):
    try:
        content = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    sources[str(Path(path).absolute())] = quick.digest_bytes(content)
    try:
        text = content.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is not None:
                _check_yaml_shape(node, path)
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        location = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{location}: malformed YAML: {problem}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: expected a mapping of sections at the top level, got {_kind(data)}")
    lines: dict[tuple, int] = {}
    _record_lines(node, (), lines)
    return data, lines


def _anchor_local_files(value, directory):
    """A relative password or key file is relative to the config file (as env_files are), never to
    wherever the command happens to start (cron starts in $HOME, systemd in /)."""
    if isinstance(value, dict):
        return {k: (str(directory / v) if _is_local_file_key(k) and isinstance(v, str) and v
                    and not Path(v).is_absolute() else _anchor_local_files(v, directory))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_anchor_local_files(v, directory) for v in value]
    return value


def _is_local_file_key(key):
    return isinstance(key, str) and (key.endswith("password_file") or key == "key_file")


def _check_yaml_shape(root, path):
    """Refuse what YAML allows but a config never means: a key given twice in one mapping (the last one
    would win silently) and aliases that expand to more nodes than any config has (an alias bomb)."""
    sizes: dict[int, int] = {}

    def size(node):
        if id(node) in sizes:
            return sizes[id(node)]
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    if key_node.value in seen:
                        raise ConfigError(f"{path}:{key_node.start_mark.line + 1}: key {key_node.value!r} is given "
                                          f"twice in the same mapping (first on line {seen[key_node.value]})")
                    seen[key_node.value] = key_node.start_mark.line + 1
                total += size(key_node) + size(value_node)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(size(item) for item in node.value)
        if total > _MAX_YAML_NODES:
            raise ConfigError(f"{path}:{node.start_mark.line + 1}: the YAML expands to more than {_MAX_YAML_NODES} "
                              f"values through its aliases; refusing it")
        sizes[id(node)] = total
        return total

    size(root)


def _record_lines(node, key_path, lines):
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*key_path, str(key_node.value))
            lines[child] = key_node.start_mark.line + 1
            _record_lines(value_node, child, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*key_path, str(index))
            lines[child] = item.start_mark.line + 1
            _record_lines(item, child, lines)


def _with_env_files(env_files, config_path, environ, where, sources):
    import io

    from dotenv import dotenv_values

    if not isinstance(env_files, list):
        env_files = [env_files]
    merged = dict(environ)
    for index, name in enumerate(env_files):
        file = Path(str(name))
        if not file.is_absolute() and config_path is not None:
            file = config_path.parent / file
        if not file.is_file():
            raise ConfigError(f"{where.at(('dbdeck', 'env_files', index))}: dbdeck.env_files[{index}]: "
                              f"file not found: {file}")
        data = file.read_bytes()
        sources[str(file.absolute())] = quick.digest_bytes(data)
        for key, value in dotenv_values(stream=io.StringIO(data.decode(errors="replace"))).items():
            if key not in merged and value is not None:  # the real environment wins over files
                merged[key] = value
    return merged


def _interpolate(value, environ, where, key_path):
    if isinstance(value, dict):
        return {k: _interpolate(v, environ, where, (*key_path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, environ, where, (*key_path, i)) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def replace(match):
        if match.group(0) == "$$":
            return "$"
        name, default = match.group("name"), match.group("default")
        if environ.get(name) not in (None, ""):
            return environ[name]
        if default is not None:
            return _INTERPOLATION.sub(replace, default)
        raise ConfigError(f"{where.at(key_path)}: {_dotted(key_path)}: environment variable {name} is not set "
                          f"(write ${{{name}:-default}} to give a default)")

    covered = [m.span() for m in _INTERPOLATION.finditer(value)]
    for start in (i for i in range(len(value) - 1) if value.startswith("${", i)):
        if not any(a <= start < b for a, b in covered):
            raise ConfigError(f"{where.at(key_path)}: {_dotted(key_path)}: cannot read the ${{...}} at "
                              f"{value[start:start + 40]!r}: write ${{NAME}}, ${{NAME:-default}} (one level of "
                              f"nesting in the default) or $$ for a literal $")
    return _INTERPOLATION.sub(replace, value)


def _set_dotted(data, key_path, value, base=None):
    """data[k1][k2]...= value; a level that is not a mapping yet starts from base(key_path, current)."""
    node = data
    for depth, key in enumerate(key_path[:-1]):
        if not isinstance(node.get(key), dict):
            node[key] = base(key_path[:depth + 1], node.get(key)) if base else {}
        node = node[key]
    node[key_path[-1]] = value


def _override_base(raw, spec, key_path, current):
    """What an environment variable overriding one field of a nested setting starts from, so that it
    changes that field only: PROD_DB_CONTAINER=x on `source: prod` keeps prod's user, database and role
    (a copy of the named endpoint), and on an unset source keeps the section's default endpoint."""
    import copy

    if len(key_path) != 2:
        return {}
    if isinstance(current, str):
        endpoint = (raw.get("endpoints") or {}).get(current)
        return copy.deepcopy(endpoint) if isinstance(endpoint, dict) else {}
    if current is None:
        field = spec.model_class().model_fields.get(key_path[1])
        default = getattr(field, "default", None)
        if isinstance(default, BaseModel):
            return default.model_dump(exclude_unset=True)
    return {}


def _validate(model, value, key_path, where):
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        problems = []
        errors = [(_without_union_tags(error["loc"]), error) for error in exc.errors()]
        for error_loc, error in errors:
            if _superseded(error_loc, error, errors):
                continue
            loc = (*key_path, *error_loc)
            key = _dotted(loc)
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                fields = _fields_at(model, error["loc"][:-1])
                message = f"unknown key (expected one of: {', '.join(sorted(fields))})" if fields else "unknown key"
            elif (not any(h in key.lower() for h in _SECRET_KEY_HINTS) and error["type"] != "missing"
                  and not isinstance(error.get("input"), dict)):
                message += f", got {_short(error.get('input'))}"
            problems.append(f"{where.at(loc)}: {key}: {message}")
        raise ConfigError("\n".join(problems)) from None


def _without_union_tags(loc):
    """pydantic names the member of a union that failed (`str`, `function-after[...]`, a model's class name)
    among the keys; the user's file has no such key."""
    return tuple(part for part in loc if not (isinstance(part, str) and (
        part in ("str", "int", "float", "bool", "list", "dict", "none") or part.startswith("function-")
        or part in _model_names())))


def _model_names():
    names, pending = set(), [BaseModel]
    while pending:
        for subclass in pending.pop().__subclasses__():
            if subclass.__name__ not in names:
                names.add(subclass.__name__)
                pending.append(subclass)
    return names - {"BaseModel"}


def _superseded(loc, error, errors):
    """A union member that failed only on the value's type (`endpoint:` is a NAME or a mapping) says
    nothing when another member took the value and failed deeper inside it."""
    return error["type"].endswith("_type") and any(
        other is not error and len(other_loc) > len(loc) and other_loc[:len(loc)] == loc
        for other_loc, other in errors)


def _fields_at(model, loc):
    """The field names of the (nested) model found at loc, for 'expected one of' hints."""
    for key in loc:
        annotation = getattr(model, "model_fields", {}).get(key)
        if annotation is None:
            root = getattr(model, "model_fields", {}).get("root")
            if root is None:
                return []
            args = getattr(root.annotation, "__args__", ())
            model = args[-1] if args else None
            continue
        model = annotation.annotation
    return list(getattr(model, "model_fields", {}) or [])


def _dotted(key_path):
    out = ""
    for key in key_path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out


def _kind(value):
    return {dict: "a mapping", list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "true/false", type(None): "nothing"}.get(type(value), type(value).__name__)


def _short(value):
    text = repr(value) if not isinstance(value, dict) else "a mapping"
    return secrets.mask(text if len(text) <= 60 else text[:57] + "...")


def dump(config):
    """The effective configuration as plain data, secrets masked (for `dbdeck config show`)."""
    def plain(model):
        return model.model_dump(mode="json", exclude_none=True)

    out: dict[str, Any] = {name: plain(model) for name, model in config.sections().items()}
    out["endpoints"] = {name: plain(ep) for name, ep in config.endpoints.items()}
    return out
