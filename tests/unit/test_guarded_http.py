"""Issue 29.2: the health and metrics ports, against real sockets. Idle, slow and hanging-up clients neither
starve the port (a check sent after them is answered at once), nor use descriptors without bound, nor
spin the CPU, nor write tracebacks."""

import http.client
import json
import logging
import os
import socket
import threading
import time
import urllib.request

import pytest

from dbdeck.httpserve import GuardedHTTPServer, parse_address, serve_metrics
from dbdeck.plugins.replication.cluster import NodeState, Snapshot, Standby
from dbdeck.plugins.replication.health import Shared, _handler
from dbdeck.plugins.sandbox.servers import free_port


def _snapshot():
    primary = NodeState("a", reachable=True, responded=True, in_recovery=False, timeline=1, version="15",
                        read_only=False, current_lsn="0/5000000")
    return Snapshot([primary, NodeState("b", error="connection refused")], [Standby("b", False)])


@pytest.fixture
def health():
    probes = []

    def probe():
        probes.append(time.monotonic())
        return _snapshot()

    server = GuardedHTTPServer(("127.0.0.1", free_port()), _handler("a", Shared(probe, 0.2)), name="health a",
                               max_connections=16, timeout=1.0)
    server.serve_in_thread()
    server.probes = probes
    yield server
    server.stop()


def _get(server, path="/primary", timeout=2.0):
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


def _open_descriptors():
    return len(os.listdir("/proc/self/fd"))


def test_a_thousand_idle_connections_neither_starve_the_checks_nor_the_descriptors(health, caplog):
    caplog.set_level(logging.DEBUG, logger="dbdeck.http")
    before = _open_descriptors()
    idle = []
    for _ in range(1000):
        client = socket.create_connection(health.server_address)
        idle.append(client)
        if len(idle) % 100 == 0:  # our side of them: the clients' descriptors are the test's own
            time.sleep(0.05)
    try:
        # answered within HAProxy's check timeout (the accept queue holds the 1,000 before it)
        assert _get(health, timeout=3.0)[0] == 200
        assert health.open_connections() <= health.max_connections
        # the server holds at most max_connections of them; the 1000 client ends are this test's
        assert _open_descriptors() - before - len(idle) <= health.max_connections + 4
    finally:
        for client in idle:
            client.close()
    assert "Traceback" not in caplog.text


def test_an_idle_or_slow_client_is_dropped_after_the_timeout(health):
    client = socket.create_connection(health.server_address)
    client.sendall(b"GET /prim")  # never finishes its request line
    client.settimeout(5)
    started = time.monotonic()
    assert client.recv(100) == b""  # closed without an answer
    assert time.monotonic() - started < 3.0, "the server kept a slow client past its timeout"
    client.close()


def test_a_check_that_hangs_up_early_is_one_debug_line_not_a_traceback(health, caplog):
    caplog.set_level(logging.DEBUG)
    for _ in range(50):
        client = socket.create_connection(health.server_address)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
        client.sendall(b"GET /primary HTTP/1.0\r\n\r\n")
        client.close()
    time.sleep(0.5)
    assert _get(health)[0] == 200
    assert "Traceback" not in caplog.text and "Error" not in "".join(
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_checks_arriving_together_share_one_probe(health):
    results = []
    threads = [threading.Thread(target=lambda: results.append(_get(health)[0])) for _ in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [200] * 30
    assert len(health.probes) <= 3, len(health.probes)


def test_out_of_descriptors_pauses_accepting_instead_of_spinning(health):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (_open_descriptors() + 20, hard))
    try:
        try:
            while True:
                held.append(open(os.devnull))
        except OSError:
            pass
        clients = []
        for _ in range(5):
            try:
                clients.append(socket.create_connection(health.server_address, timeout=1))
            except OSError:
                break
        cpu = time.process_time()
        time.sleep(1.5)
        assert time.process_time() - cpu < 0.75, "the server spun while out of descriptors"
        for client in clients:
            client.close()
    finally:
        for handle in held:
            handle.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    time.sleep(0.6)
    assert _get(health)[0] == 200, "the server did not recover once descriptors were free again"


def test_metrics_scrapes_share_one_probe_and_parse():
    from prometheus_client import CollectorRegistry
    from prometheus_client.parser import text_string_to_metric_families

    from dbdeck.plugins.replication.metrics import ReplicationCollector

    probes = []
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReplicationCollector(Shared(lambda: probes.append(1) or (_snapshot(), 2), 1.0).get))
    server = serve_metrics(registry, ("127.0.0.1", free_port()))
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        bodies = [urllib.request.urlopen(url, timeout=5).read().decode() for _ in range(20)]
        assert len(probes) == 1
        names = {family.name for family in text_string_to_metric_families(bodies[-1])}
        assert {"pg_up", "pg_replication_check_status"} <= names
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(url.replace("/metrics", "/nope"), timeout=5)
        assert missing.value.code == 404
    finally:
        server.stop()


@pytest.mark.parametrize("text, expected", [(":9187", ("127.0.0.1", 9187)), ("9187", ("127.0.0.1", 9187)),
                                            ("0.0.0.0:80", ("0.0.0.0", 80)), ("[::1]:9187", ("::1", 9187))])
def test_one_bind_rule_for_every_serve(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["host:", "host:99999", "host:x", "host:0"])
def test_a_bad_serve_address_is_refused(text):
    with pytest.raises(ValueError, match="HOST"):
        parse_address(text)
