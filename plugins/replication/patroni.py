"""manager: patroni — Patroni with etcd runs the cluster (leader election, failover, rejoin); dbdeck renders
its configuration from the same YAML and drives it through Patroni's REST API.

dbdeck grows no consensus of its own: with more than one pair of hands on a cluster, the leader lock in
etcd decides. Commands that change roles ask Patroni (POST /switchover, /failover, /reinitialize) and
take the HTTP status as the verdict: `patronictl switchover` exits 0 even when the API refuses.
"""

import base64
import json
import logging
import re
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from dbdeck.errors import DbdeckError, Refused, UsageError

log = logging.getLogger("dbdeck.replication")

RUNNING = ("running", "streaming")


class PatroniAPI:
    """The REST API of every node (http://<endpoint host>:<health_port>), with the rest user's password
    for the calls that change something."""

    def __init__(self, pair):
        self.pair = pair
        self.settings = pair.settings.patroni
        self.timeout = self.settings.request_timeout

    def url(self, node):
        return f"http://{node.endpoint.host or '127.0.0.1'}:{node.config.health_port}"

    def _auth(self):
        from .setup import read_secret

        password = read_secret(rest_password_file(self.pair), "Patroni REST API password", True,
                               "run `dbdeck patroni render` first (it generates one)")
        token = base64.b64encode(f"{self.settings.rest_user}:{password}".encode()).decode()
        return f"Basic {token}"

    def request(self, node, path, body=None, timeout=None):
        """(HTTP status, parsed JSON or text); raises DbdeckError when the node's API does not answer."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url(node) + path, data=data, method="POST" if data else "GET")
        if data is not None:
            request.add_header("Content-Type", "application/json")
            request.add_header("Authorization", self._auth())
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DbdeckError(f"Patroni REST API of {node.name} ({self.url(node)}) does not answer: {reason}") \
                from None
        text = raw.decode(errors="replace").strip()
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def first(self, path, timeout=None):
        """GET path from the first node whose API answers (any member knows the cluster)."""
        errors = []
        for node in self.pair.nodes:
            try:
                status, body = self.request(node, path, timeout=timeout)
            except DbdeckError as exc:
                errors.append(str(exc))
                continue
            if status == 200:
                return body
            errors.append(f"{node.name}: GET {path} answered {status}")
        raise DbdeckError("no Patroni REST API answers: " + "; ".join(errors))

    def cluster(self, timeout=None):
        return self.first("/cluster", timeout)

    def post(self, node, path, body, what):
        """POST and fail with Patroni's own words unless it answered 200."""
        status, answer = self.request(node, path, body, timeout=max(self.timeout, self.pair.settings.wait_timeout))
        if status != 200:
            text = answer if isinstance(answer, str) else json.dumps(answer)
            raise DbdeckError(f"Patroni refused the {what} (HTTP {status} from {node.name}): {text}")
        return answer


def rest_password_file(pair):
    configured = pair.settings.patroni.rest_password_file
    return Path(configured) if configured else pair.app.config.state_dir / "replication" / "patroni-rest.password"


def rewind_password_file(pair):
    configured = pair.settings.patroni.rewind_password_file
    return Path(configured) if configured else pair.app.config.state_dir / "replication" / "rewind.password"


# --- reading the cluster -----------------------------------------------------------------------------

def members(cluster):
    return {m["name"]: m for m in cluster.get("members", [])}


def leader_of(cluster):
    return next((m["name"] for m in cluster.get("members", []) if m.get("role") in ("leader", "standby_leader")),
                None)


def problems(cluster, pair):
    """(status, text) lines for check-replication: what Patroni itself reports as wrong."""
    from .cluster import CRITICAL, WARNING

    found = []
    known = members(cluster)
    if cluster.get("pause"):
        found.append((WARNING, "Patroni is paused (maintenance mode): no automatic failover until `resume`"))
    if leader_of(cluster) is None:
        found.append((CRITICAL, "Patroni has no leader: no member holds the leader lock"))
    for node in pair.nodes:
        member = known.get(node.name)
        if member is None:
            found.append((CRITICAL, f"{node.name} is not a Patroni member of {pair.settings.patroni.scope}"))
        elif member.get("state") not in RUNNING:
            found.append((CRITICAL, f"Patroni member {node.name} is {member.get('state')}"))
    if pair.settings.synchronous_standby_names and leader_of(cluster) and len(known) > 1 and not any(
            m.get("role") == "sync_standby" for m in known.values()):
        found.append((WARNING, "synchronous_mode is on but Patroni reports no sync_standby: commits do not wait "
                               "for a standby"))
    return found


# --- changing roles --------------------------------------------------------------------------------

def _running_replicas(cluster, max_lag=None):
    replicas = [m for m in cluster.get("members", []) if m.get("role") in ("replica", "sync_standby")
                and m.get("state") in RUNNING and not (m.get("tags") or {}).get("nofailover")]
    if max_lag is not None:
        replicas = [m for m in replicas if isinstance(m.get("lag"), int) and m["lag"] <= max_lag]
    # a synchronous standby first (it has every commit), then the least lag
    return sorted(replicas, key=lambda m: (m.get("role") != "sync_standby",
                                           m["lag"] if isinstance(m.get("lag"), int) else 1 << 62))


def _refuse_asynchronous(pair, cluster, candidate):
    """synchronous_mode: Patroni promotes only the synchronous standby (it alone has every commit), and a
    request naming another one fails with a bare 'Failover failed'; say why before asking."""
    if not pair.settings.synchronous_standby_names:
        return
    synchronous = [m["name"] for m in cluster.get("members", []) if m.get("role") == "sync_standby"]
    if synchronous and candidate not in synchronous:
        raise Refused(f"{candidate} is not the synchronous standby ({', '.join(synchronous)}): with synchronous "
                      f"replication Patroni promotes only that one, which has every acknowledged commit")


def switchover(pair, candidate=None, max_lag=None):
    """POST /switchover to the leader; returns once the candidate accepts writes."""
    api = PatroniAPI(pair)
    cluster = api.cluster()
    leader = leader_of(cluster)
    if leader is None:
        raise Refused("Patroni has no leader: nothing to switch over from (promote-replica fails over)")
    replicas = _running_replicas(cluster, max_lag)
    if candidate is not None:
        pair.node(candidate)
        if candidate == leader:
            raise UsageError(f"{candidate} is the leader already")
        if candidate not in [m["name"] for m in replicas]:
            raise Refused(f"{candidate} is not a running replica within {max_lag} bytes of the leader: "
                          + _describe(cluster))
    elif not replicas:
        raise Refused("no running replica can take over: " + _describe(cluster))
    target = candidate or replicas[0]["name"]
    _refuse_asynchronous(pair, cluster, target)
    pair.say(f"pre-checks passed: leader {leader}, candidate {target} ({_describe(cluster)})")
    if pair.runner.dry_run:
        pair.say(f"plan: POST /switchover {{leader: {leader}, candidate: {target}}} to {leader}'s REST API, then "
                 f"wait until {target} accepts writes")
        return target
    node = pair.node(leader)
    answer = api.post(node, "/switchover", {"leader": leader, "candidate": target}, "switchover")
    pair.say(f"Patroni: {answer}")
    _wait_for_leader(pair, api, target)
    return target


def failover(pair, candidate=None, force=False):
    """POST /failover: promote a replica when the leader is gone (or, with force, even if it is not)."""
    api = PatroniAPI(pair)
    cluster = api.cluster()
    leader = leader_of(cluster)
    if leader is not None and not force:
        live = pair.accepts_writes(pair.node(leader)) if leader in [n.name for n in pair.nodes] else True
        if live:
            raise Refused(f"{leader} is the leader and accepts writes: promote-replica is for a lost primary "
                          f"(use switchover, or --force to fail over anyway)")
    replicas = _running_replicas(cluster)
    target = candidate or (replicas[0]["name"] if replicas else None)
    if target is None:
        raise Refused("no running replica to promote: " + _describe(cluster))
    pair.node(target)
    _refuse_asynchronous(pair, cluster, target)
    if pair.runner.dry_run:
        pair.say(f"plan: POST /failover {{candidate: {target}}}, then wait until {target} accepts writes")
        return target
    if force and leader is not None:
        pair.say(f"WARNING: failing over although {leader} holds the leader lock (--force)", logging.WARNING)
    body = {"candidate": target, **({"leader": leader} if leader and force else {})}
    answer = api.post(pair.node(target), "/failover", body, "failover")
    pair.say(f"Patroni: {answer}")
    _wait_for_leader(pair, api, target)
    return target


def reinitialize(pair, name=None):
    """POST /reinitialize to a replica: Patroni wipes it and copies the leader; returns once it streams."""
    api = PatroniAPI(pair)
    cluster = api.cluster()
    leader = leader_of(cluster)
    others = [n.name for n in pair.nodes if n.name != leader]
    if name is None:
        broken = [m["name"] for m in cluster.get("members", []) if m["name"] in others
                  and m.get("state") not in RUNNING]
        if len(broken) != 1 and len(others) != 1:
            raise UsageError(f"which node? --node one of: {', '.join(others)}")
        name = broken[0] if len(broken) == 1 else others[0]
    node = pair.node(name)
    if name == leader:
        raise Refused(f"{name} is the leader: Patroni reinitializes replicas only (switch over first)")
    if pair.runner.dry_run:
        pair.say(f"plan: POST /reinitialize {{force: true}} to {name}, then wait until it streams from {leader}")
        return name
    started_before = _postmaster_started(node)
    answer = api.post(node, "/reinitialize", {"force": True}, "reinitialize")
    pair.say(f"Patroni: {answer}")
    primary = pair.node(leader) if leader else None
    # done when a *new* postmaster (the copy's) streams: the old one may still stream for a moment
    pair.wait_for(lambda: _member_state(api, name) in RUNNING and primary is not None
                  and _postmaster_started(node) not in (None, started_before)
                  and pair.is_streaming(node, primary), f"{name} to stream from {leader} again")
    pair.say(f"{name} was reinitialized by Patroni and streams from {leader}")
    return name


def _postmaster_started(node):
    try:
        with node.connect(timeout=3) as conn:
            return conn.execute("SELECT pg_postmaster_start_time()").fetchone()[0]
    except Exception:  # down or refusing: no start time to compare
        return None


def _member_state(api, name):
    try:
        return members(api.cluster(timeout=3)).get(name, {}).get("state")
    except DbdeckError:
        return None


def _wait_for_leader(pair, api, target):
    node = pair.node(target)

    def done():
        try:
            cluster = api.cluster(timeout=3)
        except DbdeckError:
            return False
        return leader_of(cluster) == target and pair.accepts_writes(node)

    pair.wait_for(done, f"{target} to lead and accept writes")
    pair.say(f"{target} is the leader and accepts writes")


def _describe(cluster):
    return ", ".join(f"{m['name']} {m.get('role')} {m.get('state')}"
                     + (f" lag {m['lag']}" if "lag" in m else "") for m in cluster.get("members", []))


def history(pair):
    """Patroni's timeline switches as dbdeck history entries (kind patroni.<reason-ish>)."""
    from datetime import datetime

    entries = []
    for row in PatroniAPI(pair).first("/history", timeout=5):
        timeline, lsn, reason, *rest = row + [None] * (5 - len(row))
        at, new_leader = rest[0], rest[1]
        ts = datetime.fromisoformat(at).timestamp() if at else None
        entries.append({"at": at or "", "ts": ts or 0, "kind": "patroni.timeline", "severity": "info",
                        "message": f"timeline {timeline} ended at LSN {lsn}: {reason}"
                                   + (f"; new leader {new_leader}" if new_leader else ""),
                        "details": {"timeline": timeline, "lsn": lsn, "new_leader": new_leader}})
    return entries


# --- rendering -----------------------------------------------------------------------------------

class _PlainDumper(yaml.SafeDumper):
    def ignore_aliases(self, data):  # Patroni's file is read by people: no &id001 anchors
        return True


def _hba(pair):
    settings, patroni = pair.settings, pair.settings.patroni
    lines = ["local all all scram-sha-256"]
    for network in settings.replication_networks:
        lines.append(f"host replication {settings.replication_user} {network} scram-sha-256")
        lines.append(f"host all all {network} scram-sha-256")
    lines += [f"host all all {network} scram-sha-256" for network in patroni.client_networks]
    return lines


def node_config(pair, node):
    from .nodes import _host_bindir

    settings, patroni = pair.settings, pair.settings.patroni
    host = node.endpoint.host or "127.0.0.1"
    port = node.endpoint.port or 5432
    dcs = {"ttl": patroni.ttl, "loop_wait": patroni.loop_wait, "retry_timeout": patroni.retry_timeout,
           "maximum_lag_on_failover": patroni.maximum_lag_on_failover,
           "postgresql": {"use_pg_rewind": True, "use_slots": True,
                          "parameters": {"wal_level": "replica", "hot_standby": "on", "wal_log_hints": "on",
                                         "max_wal_senders": 10, "max_replication_slots": 10,
                                         **patroni.parameters}}}
    if settings.synchronous_standby_names:
        dcs["synchronous_mode"] = True  # Patroni then manages synchronous_standby_names itself
    if settings.backup is not None:
        # Barman streams through its own slot: permanent, so Patroni keeps it on whichever node leads
        dcs["slots"] = {settings.backup.slot: {"type": "physical"}}
    return {
        "scope": patroni.scope,
        "namespace": patroni.namespace,
        "name": node.name,
        "restapi": {"listen": f"{host}:{node.config.health_port}",
                    "connect_address": f"{host}:{node.config.health_port}"},
        "etcd3": {"hosts": list(patroni.etcd_hosts)},
        "bootstrap": {"dcs": dcs, "initdb": [{"encoding": "UTF8"}, "data-checksums"], "pg_hba": _hba(pair)},
        "postgresql": {
            "listen": f"{host}:{port}",
            "connect_address": f"{host}:{port}",
            "data_dir": str(node.config.data_dir),
            "bin_dir": str(_host_bindir(node.config.bindir)),
            "pgpass": str(patroni.pgpass_dir / f"patroni-{patroni.scope}-{node.name}.pgpass"),
            "authentication": {"superuser": {"username": patroni.superuser},
                               "replication": {"username": settings.replication_user},
                               "rewind": {"username": patroni.rewind_user}},
            "parameters": {key: value for key, value in node.config.settings.items() if key != "port"},
            "pg_hba": _hba(pair),
        },
        "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False, "nosync": False},
    }


def _superuser_password(pair):
    from .setup import read_secret

    configured = pair.settings.patroni.superuser_password_file
    if configured:
        return read_secret(configured, "PostgreSQL superuser password")
    passwords = {n.endpoint.config.password.get_secret_value() if n.endpoint.config.password else None
                 for n in pair.nodes}
    if len(passwords) != 1 or None in passwords:
        raise UsageError("patroni: every node needs the same superuser password: set patroni.superuser_password_file "
                         "(or the same endpoint.password_file on every node)")
    return passwords.pop()


def _env_value(value):
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(pair, source=None):
    """({file name: text}, [(path, secret, what) to store]): <node>.yml per node, env.conf (the secrets, for
    systemd's EnvironmentFile) and haproxy.cfg routed by Patroni's REST checks. Secrets that do not exist
    yet are generated but not stored: the caller stores them once the files pass their checks."""
    from .haproxy import comment_safe
    from .haproxy import render as render_haproxy
    from .setup import new_secret, password_file, read_secret

    patroni = pair.settings.patroni
    new_secrets = []

    def secret(path, what):
        value = read_secret(path, what, required=False)
        if value is None:
            value = new_secret()
            new_secrets.append((path, value, what))
        return value

    files = {}
    for node in pair.nodes:
        header = (f"# Patroni node {node.name} of {patroni.scope}, rendered by `dbdeck patroni render`"
                  f"{f' from {comment_safe(source)}' if source else ''}.\n"
                  f"# Passwords are not here: env.conf (mode 0600) holds them for "
                  f"`systemctl start patroni@{node.name}`.\n")
        files[f"{node.name}.yml"] = header + yaml.dump(node_config(pair, node), Dumper=_PlainDumper,
                                                       sort_keys=False, default_flow_style=False)
    values = {
        "PATRONI_SUPERUSER_PASSWORD": _superuser_password(pair),
        "PATRONI_REPLICATION_PASSWORD": secret(password_file(pair), f"{pair.settings.replication_user} password"),
        "PATRONI_REWIND_PASSWORD": secret(rewind_password_file(pair), f"{patroni.rewind_user} password"),
        "PATRONI_RESTAPI_USERNAME": patroni.rest_user,
        "PATRONI_RESTAPI_PASSWORD": secret(rest_password_file(pair), "Patroni REST API password"),
    }
    unsafe = [key for key, value in values.items() if re.search(r"[\x00-\x1f\x7f]", value)]
    if unsafe:
        raise UsageError(f"patroni render: {', '.join(unsafe)} holds a control character (a newline?), which "
                         f"env.conf cannot carry: use a password without one")
    files["env.conf"] = ("# Patroni's secrets (systemd EnvironmentFile of patroni@.service); keep it mode 0600.\n"
                         + "".join(f"{key}={_env_value(value)}\n" for key, value in values.items()))
    files["haproxy.cfg"] = render_haproxy(pair, source=source)
    return files, new_secrets


_HOST_STATE = ("is already in use", "is not reachable")


def validate(runner, files):
    """`patroni --validate-config` on every node file; returns the problems (empty when all pass)."""
    import os
    import shutil
    import tempfile

    program = shutil.which("patroni", path=os.environ.get("PATH", "") + ":/usr/bin:/usr/local/bin")
    if program is None:
        raise FileNotFoundError("patroni")
    found = []
    with tempfile.TemporaryDirectory(prefix="dbdeck-patroni-") as directory:
        for name, text in files.items():
            if not name.endswith(".yml"):
                continue
            path = Path(directory) / name
            path.write_text(text)
            result = runner.run([program, "--validate-config", str(path)], read_only=True, check=False)
            if not result.ok:
                # the validator also probes this host's ports and etcd: meaningless where dbdeck renders (a
                # management host, a cluster already running), so only the configuration's own problems count
                lines = [line.strip() for line in (result.stdout + "\n" + result.stderr).splitlines()
                         if line.strip() and not any(state in line for state in _HOST_STATE)]
                if lines:
                    found.append(f"{name}: " + "; ".join(lines[:5]))
    return found


# --- from a native pair --------------------------------------------------------------------------

# set by dbdeck's native commands with ALTER SYSTEM; postgresql.auto.conf would override Patroni's values
MANAGED_BY_PATRONI = ("synchronous_standby_names", "primary_conninfo", "primary_slot_name", "port",
                      "listen_addresses")
# what pg_rewind needs from a non-superuser source role (Patroni's documentation)
_REWIND_GRANTS = ("pg_catalog.pg_ls_dir(text, boolean, boolean)", "pg_catalog.pg_stat_file(text, boolean)",
                  "pg_catalog.pg_read_binary_file(text)",
                  "pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean)")


def etcd_problem(pair):
    """None when one of the etcd hosts answers /health with health true, else why not."""
    reasons = []
    for host in pair.settings.patroni.etcd_hosts:
        try:
            with urllib.request.urlopen(f"http://{host}/health", timeout=5) as response:
                if json.loads(response.read()).get("health") in ("true", True):
                    return None
                reasons.append(f"{host}: unhealthy")
        except (OSError, ValueError) as exc:
            reasons.append(f"{host}: {getattr(exc, 'reason', exc)}")
    return "etcd does not answer (" + "; ".join(reasons) + ")"


def ready_to_migrate(pair):
    """The snapshot of a pair that can be handed over to Patroni; raises Refused saying why not."""
    holder = pair.app.lock("auto-failover").holder()
    if holder:
        raise Refused(f"auto-failover is running (pid {holder.get('pid')}): stop it first (it would fail over "
                      f"while the nodes stop), e.g. systemctl stop dbdeck-auto-failover")
    try:
        cluster = PatroniAPI(pair).cluster(timeout=3)
    except DbdeckError:
        cluster = None  # no REST API answers: Patroni does not run yet, as expected
    if cluster is not None:
        raise Refused(f"Patroni already manages these nodes ({_describe(cluster)}): nothing to migrate; stopping "
                      f"its PostgreSQL servers by hand would only make Patroni restart them")
    snapshot = pair.probe(5)
    down = [n.name for n in snapshot.nodes if not n.reachable]
    if down or len(snapshot.primaries) != 1:
        raise Refused("migrate needs the pair running with one primary: "
                      + ", ".join(f"{n.name} {n.role}" for n in snapshot.nodes))
    lagging = [s.name for s in snapshot.standbys if s.state != "streaming"]
    if lagging:
        raise Refused(f"{', '.join(lagging)} not streaming: rebuild-replica first, so no standby is left behind")
    problem = etcd_problem(pair)
    if problem:
        raise Refused(f"{problem}: start etcd first (Patroni cannot elect a leader without it)")
    return snapshot


def migrate(pair, snapshot):
    """Hand a running native pair over to Patroni, keeping its data: the roles Patroni needs on the
    primary, no ALTER SYSTEM values that would override Patroni's, then a clean stop of the primary (its
    standbys receive the shutdown checkpoint) and of the standbys. Patroni then starts them, the primary's
    node first; it drops the native slot once inactive and keeps one slot per member instead."""
    from psycopg import sql

    from .setup import ensure_role, ensure_secret
    from .standby import PASSFILE_PATTERN, stop_node

    primary = pair.node(snapshot.primary.name)
    patroni = pair.settings.patroni
    rewind_password = ensure_secret(pair, rewind_password_file(pair), f"{patroni.rewind_user} password")
    pair.say(f"preparing {primary.name} for Patroni: role {patroni.rewind_user} for pg_rewind")
    with primary.connect() as conn, primary.endpoint.driver_errors("patroni migrate"):
        ensure_role(pair, conn, patroni.rewind_user, rewind_password, generated=False, replication=False)
        for function in _REWIND_GRANTS:
            statement = f"GRANT EXECUTE ON FUNCTION {function} TO {patroni.rewind_user}"
            if pair.runner.dry_run:
                pair.say(f"would execute: {statement}")
            else:
                conn.execute(sql.SQL(statement.replace(patroni.rewind_user, "{}")).format(
                    sql.Identifier(patroni.rewind_user)))
    for node in pair.nodes:
        pair.say(f"{node.name}: ALTER SYSTEM RESET {', '.join(MANAGED_BY_PATRONI)} (Patroni sets them)")
        if pair.runner.dry_run:
            continue
        with node.connect() as conn, node.endpoint.driver_errors("ALTER SYSTEM RESET"):
            conn.autocommit = True
            for name in MANAGED_BY_PATRONI:
                conn.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(name)))
    pair.say(f"stopping {primary.name} (fast: its standbys receive the shutdown checkpoint), then the standbys")
    stop_node(pair, primary, "fast")
    for node in pair.nodes:
        if node.name != primary.name:
            stop_node(pair, node, "fast")
    for node in pair.nodes:  # Patroni keeps its own pgpass: dbdeck's copy of the secret goes
        node.driver.shell(f'rm -f "$1"/{PASSFILE_PATTERN}', node.driver.data_dir, offline=True)
    return primary.name
