"""webhook-relay against real local HTTP servers: a primary, a mirror, a hanging mirror, a dead one."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import BIN, wait_for

pytestmark = pytest.mark.integration


class Recorder(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, status=200, hang=None):
        self.requests = []
        self.status = status
        self.hang = hang  # an Event the handler waits on before answering
        super().__init__(("127.0.0.1", 0), RecordingHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address):
        # the relay hanging up on a slow answer is what the timeout tests cause; anything else is printed
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class RecordingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                     "body": body})
        if self.server.hang is not None:
            self.server.hang.wait(30)
        answer = json.dumps({"received": len(body)}).encode()
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Primary-Says", "hello")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    do_GET = do_POST  # noqa: N815

    def log_message(self, *args):
        pass


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def relay(tmp_path):
    started = []

    def start(*args, env=None):
        port = free_port()
        config = tmp_path / "dbdeck.yaml"
        config.write_text(f"dbdeck:\n  log_dir: {tmp_path}/logs\n  state_dir: {tmp_path}/state\n"
                          f"  run_dir: {tmp_path}/run\n")
        process = subprocess.Popen([str(BIN / "webhook-relay"), "--config", str(config), "--listen",
                                    f"127.0.0.1:{port}", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env={**os.environ, **(env or {})}, text=True)
        started.append(process)

        def listening():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return True
            except OSError:
                assert process.poll() is None, process.stderr.read()
                return False

        wait_for(listening, timeout=15)
        return f"http://127.0.0.1:{port}", process, tmp_path / "logs" / f"webhook-relay-{time.strftime('%Y%m%d')}.log"

    yield start
    for process in started:
        process.send_signal(signal.SIGTERM)
        process.wait(10)


def post(url, body=b'{"entry": [1]}', headers=None):
    request = urllib.request.Request(url + "/webhooks/whatsapp?x=1", data=body, method="POST", headers={
        "Content-Type": "application/json", "X-Hub-Signature-256": "sha256=abc", "Authorization": "Bearer secret",
        **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_primary_answer_returned_unchanged_and_copy_mirrored_with_seed_headers(relay):
    primary, mirror = Recorder(status=201), Recorder()
    url, _, log_file = relay("--primary", primary.url, "--mirror", mirror.url + "/webhooks/whatsapp")
    status, headers, body = post(url)
    assert (status, headers["X-Primary-Says"], json.loads(body)) == (201, "hello", {"received": 14})
    assert primary.requests[0]["path"] == "/webhooks/whatsapp?x=1"
    assert primary.requests[0]["headers"]["authorization"] == "Bearer secret"  # the primary gets everything

    wait_for(lambda: mirror.requests, timeout=10)
    copy = mirror.requests[0]
    assert copy["path"] == "/webhooks/whatsapp?x=1" and copy["body"] == b'{"entry": [1]}'
    assert copy["headers"]["x-hub-signature-256"] == "sha256=abc"
    assert copy["headers"]["content-type"] == "application/json"
    assert copy["headers"]["x-replicated-from"] == "production"
    assert datetime.fromisoformat(copy["headers"]["x-replicated-at"]).tzinfo is not None
    assert "authorization" not in copy["headers"]  # only the seed's replicated headers go to dev
    wait_for(lambda: log_file.exists() and "Webhook replicated to dev environment" in log_file.read_text())
    assert "entry" not in log_file.read_text()  # bodies are never logged


def test_hanging_mirror_never_holds_up_the_primary_and_times_out(relay):
    primary, released = Recorder(), threading.Event()
    hanging = Recorder(hang=released)
    url, _, log_file = relay("--primary", primary.url, "--mirror", hanging.url + "/hook",
                             env={"DEV_WEBHOOK_TIMEOUT": "300"})
    try:
        for n in range(3):
            status, _, _ = post(url, body=b'{"n": %d}' % n)
            assert status == 200
        # all three answered while the mirror still held its first copy unanswered
        assert not released.is_set() and len(primary.requests) == 3
        wait_for(lambda: log_file.exists()
                 and "Dev environment unavailable for webhook replication" in log_file.read_text(), timeout=15)
        assert "timed out" in log_file.read_text()
    finally:
        released.set()


def test_dead_or_failing_mirror_is_logged_and_disabled_mirror_is_not_called(relay):
    primary, failing = Recorder(), Recorder(status=500)
    dead = f"http://127.0.0.1:{free_port()}/hook"
    url, _, log_file = relay("--primary", primary.url, "--mirror", dead)
    assert post(url)[0] == 200
    wait_for(lambda: log_file.exists()
             and "Dev environment unavailable for webhook replication" in log_file.read_text())

    url, _, log_file = relay("--primary", primary.url, env={"DEV_WEBHOOK_URL": failing.url + "/hook"})
    assert post(url)[0] == 200
    wait_for(lambda: "Failed to replicate webhook to dev environment" in log_file.read_text()
             and "HTTP 500" in log_file.read_text())

    quiet = Recorder()
    url, _, _ = relay("--primary", primary.url, env={"DEV_WEBHOOK_URL": quiet.url, "REPLICATE_WEBHOOKS_TO_DEV": "false"})
    assert post(url)[0] == 200
    assert post(url)[0] == 200
    assert quiet.requests == [] and len(primary.requests) == 4


def test_primary_down_is_a_502_and_bad_input_is_refused(relay, tmp_path):
    url, _, log_file = relay("--primary", f"http://127.0.0.1:{free_port()}")
    status, _, body = post(url)
    assert status == 502 and b"primary unavailable" in body
    assert "unavailable" in log_file.read_text()

    for args, message in ((["--primary", "ftp://x"], "expected an http:// or https:// URL"),
                          (["--listen", "nonsense", "--primary", "http://127.0.0.1:1"], "expected HOST:PORT"),
                          ([], "no primary URL")):
        done = subprocess.run([str(BIN / "webhook-relay"), "--config", str(tmp_path / "dbdeck.yaml"), *args],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and message in done.stderr


def test_dbdeck_status_sees_the_relay_alive_killed_and_stopped(relay, tmp_path):
    primary = Recorder()
    _, process, _ = relay("--primary", primary.url)
    config = tmp_path / "dbdeck.yaml"

    def services():
        done = subprocess.run([str(BIN / "dbdeck"), "--config", str(config), "status", "--format", "json"],
                              capture_output=True, text=True, timeout=30)
        return done.returncode, {r["name"]: r for r in json.loads(done.stdout) if r["kind"] == "service"}

    code, rows = services()
    (name, row), = rows.items()
    assert code == 0 and name.startswith("webhook-relay.") and row["state"] == "up"
    assert row["data"]["pid"] == process.pid
    process.kill()
    process.wait(10)
    code, rows = services()
    assert code == 1 and rows[name]["state"] == "dead" and "without stopping cleanly" in rows[name]["detail"]
    metrics = subprocess.run([str(BIN / "dbdeck"), "--config", str(config), "status", "--format", "prometheus"],
                             capture_output=True, text=True, timeout=30).stdout
    assert f'dbdeck_service_up{{service="{name}"}} 0.0' in metrics and "dbdeck_status_problems 1.0" in metrics

    port = name.split(".", 1)[1]
    again = subprocess.Popen([str(BIN / "webhook-relay"), "--config", str(config), "--listen", f"127.0.0.1:{port}",
                              "--primary", primary.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: services()[1][name]["state"] == "up", timeout=15)
    finally:
        again.send_signal(signal.SIGTERM)
        again.wait(10)
    code, rows = services()
    assert code == 0 and rows[name]["state"] == "stopped"


def test_only_deliveries_are_mirrored_the_relay_answers_its_health_and_says_it_started_once(relay):
    primary, mirror = Recorder(), Recorder()
    url, process, _ = relay("--primary", primary.url, "--mirror", mirror.url)
    with urllib.request.urlopen(url + "/webhooks/whatsapp?hub.mode=subscribe&hub.challenge=42", timeout=10) as got:
        assert got.status == 200  # the verification GET reaches the primary
    with urllib.request.urlopen(url + "/api/health", timeout=10) as got:
        assert got.status == 200
    assert [r["path"] for r in primary.requests] == ["/webhooks/whatsapp?hub.mode=subscribe&hub.challenge=42",
                                                     "/api/health"]
    post(url)
    wait_for(lambda: mirror.requests, timeout=10)
    time.sleep(0.5)
    assert [r["path"] for r in mirror.requests] == ["/webhooks/whatsapp?x=1"]  # the POST only
    with urllib.request.urlopen(url + "/-/relay-health", timeout=10) as got:
        health = json.loads(got.read())
    assert health["status"] == "ok" and health["mirror_dropped"] == 0
    assert len(primary.requests) == 3  # the relay's own health never reaches the primary
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=15)
    assert err.count("webhook-relay on http://") == 1, err
