"""`dbdeck haproxy render`: one stable write endpoint (and a read endpoint) in front of the pair or a
Patroni cluster, routed by the nodes' Patroni-style health checks.

The applications' DATABASE_URL points at HAProxy's write port once; after a failover HAProxy sends new
connections to the node whose /primary answers 200, and `on-marked-down shutdown-sessions` closes the
sessions still open to the old one, so no client keeps writing into a node that was fenced.
"""

import ipaddress
import re

from dbdeck.errors import ConfigError

from .model import is_host

WRITE, READ = "dbdeck_write", "dbdeck_read"


def health_check_host(pair, node):
    """Where HAProxy sends a node's health check: the node itself for Patroni's REST API, the host running
    dbdeck's health server for a native pair."""
    if pair.settings.manager == "patroni":
        return node.endpoint.host or "127.0.0.1"
    health = pair.settings.health
    return health.address or local_address(health.listen)


def local_address(listen):
    """Where a client on this host reaches a listener bound to listen (0.0.0.0 or :: mean any address)."""
    try:
        unspecified = ipaddress.ip_address(listen).is_unspecified
    except ValueError:
        unspecified = False
    return "127.0.0.1" if unspecified else listen


def _database_address(node):
    """host:port HAProxy connects clients to: what applications used to put in DATABASE_URL."""
    address = node.config.app_address
    if address:
        return address
    host, port = node.endpoint.host, node.endpoint.port or 5432
    if not host or not is_host(host):
        raise ConfigError(f"replication.nodes.{node.name}: HAProxy needs a TCP address: set endpoint.host (or "
                          f"app_address: HOST:PORT)")
    return f"{bracketed(host)}:{port}"


def bracketed(host):
    """HAProxy reads the last ':' of an address as the port's: an IPv6 address goes in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def comment_safe(text):
    """text for a one-line comment: control characters (a newline would end the comment) become '?'."""
    return re.sub(r"[\x00-\x1f\x7f]", "?", str(text))


def servers(pair):
    """(name, database address, check host, check port) for each node; every node needs a health_port."""
    missing = [n.name for n in pair.nodes if not n.config.health_port]
    if missing:
        what = ("its Patroni REST API port (restapi.listen)" if pair.settings.manager == "patroni"
                else "the port auto-failover answers its health checks on")
        raise ConfigError(f"replication.nodes: {', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no "
                          f"health_port: set it to {what}, e.g. 8008")
    rows = [(n.name, _database_address(n), health_check_host(pair, n), n.config.health_port) for n in pair.nodes]
    for name, _, check_host, _ in rows:
        if not is_host(check_host):
            raise ConfigError(f"replication.nodes.{name}: HAProxy checks its health port at {check_host!r}, which "
                              f"is not a host name or address: set endpoint.host to one")
    return rows


def _listen(name, bind, port, uri, rows, settings, balance):
    interval = settings.check_interval_ms
    lines = [f"listen {name}",
             f"    bind {bind}:{port}",
             "    mode tcp",
             f"    balance {balance}",
             "    timeout connect 4s",
             "    timeout client 30m",
             "    timeout server 30m",
             f"    timeout check {settings.check_timeout_ms}ms",
             "    option httpchk",
             f"    http-check send meth GET uri {uri}",
             "    http-check expect status 200",
             # a refused connection is retried after a 1 s turn-around: the client is better off retrying
             # at once (its next attempt reaches the new primary as soon as a check finds it)
             "    retries 0",
             # fall 2: one lost check is not a failover; rise 1: the new primary is used at its first 200;
             # a connection the server refuses marks it down at once, without waiting for the checks
             f"    default-server inter {interval}ms fastinter {max(100, interval // 2)}ms downinter {interval}ms "
             f"rise 1 fall 2 on-marked-down shutdown-sessions observe layer4 error-limit 1 on-error mark-down"]
    lines += [f"    server {node} {address} check addr {bracketed(check_host)} port {check_port}"
              for node, address, check_host, check_port in rows]
    return "\n".join(lines)


def render(pair, snippet=False, source=None):
    """haproxy.cfg text (or only its listen sections, to include in an existing configuration)."""
    settings = pair.settings.haproxy
    rows = servers(pair)
    manager = pair.settings.manager
    header = [f"# Rendered by `dbdeck haproxy render`{f' from {comment_safe(source)}' if source else ''} "
              f"({manager} manager).",
              f"# Write port {settings.bind}:{settings.write_port} -> the node whose /primary answers 200"
              + (f"; read port {settings.read_port} -> replicas within {settings.read_max_lag} bytes (/replica?lag=)"
                 if settings.read_port else "") + ".",
              "# Edit dbdeck.yaml (replication.haproxy) and render again rather than editing this file."]
    sections = [_listen(WRITE, settings.bind, settings.write_port, "/primary", rows, settings, "first")]
    if settings.read_port:
        sections.append(_listen(READ, settings.bind, settings.read_port, f"/replica?lag={settings.read_max_lag}",
                                rows, settings, "roundrobin"))
    if settings.stats_port:
        sections.append("\n".join([
            "listen dbdeck_stats", f"    bind {settings.bind}:{settings.stats_port}", "    mode http",
            "    timeout client 30s", "    timeout connect 4s", "    timeout server 30s",
            "    stats enable", "    stats uri /", "    stats refresh 5s"]))
    if snippet:
        return "\n".join(header) + "\n\n" + "\n\n".join(sections) + "\n"
    top = ["global", f"    maxconn {settings.max_connections}", "",
           "defaults", "    retries 2", "    timeout connect 4s", "    timeout client 30m",
           "    timeout server 30m", "    timeout check 5s"]
    return "\n".join(header) + "\n\n" + "\n".join(top) + "\n\n" + "\n\n".join(sections) + "\n"


def validate(runner, text):
    """Run `haproxy -c` on the text; returns None when valid, the reason when not, or raises when the
    haproxy program is missing (the caller decides whether that is fatal)."""
    import os
    import shutil

    # cron's and sudo-less PATHs often lack /usr/sbin, where Debian puts haproxy
    program = shutil.which("haproxy", path=os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin")
    if program is None:
        raise FileNotFoundError("haproxy")
    # read from standard input: checking writes no file anywhere, in a dry run too
    result = runner.run([program, "-c", "-f", "/dev/stdin"], stdin=text, read_only=True, check=False)
    if result.ok:
        return None
    output = (result.stderr or "") + (result.stdout or "")
    alerts = [line.strip() for line in output.splitlines() if "ALERT" in line] or output.strip().splitlines()[-1:]
    return "; ".join(alerts) or f"haproxy -c exited {result.returncode}"
