"""The notify plugin against a real local HTTP server and a real command."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from dbdeck import secrets
from dbdeck.config import ConfigSection, load
from dbdeck.events import Event
from dbdeck.plugins import notify as plugin
from dbdeck.plugins.notify.model import Notify


@pytest.fixture
def webhook():
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append((self.headers["content-type"], json.loads(self.rfile.read(int(self.headers["content-length"])))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()


def _config(tmp_path, text):
    path = tmp_path / "dbdeck.yaml"
    path.write_text(text)
    return load(str(path), [ConfigSection("notify", Notify)], environ={})


def test_events_reach_the_webhook_and_the_command_with_secrets_masked(tmp_path, webhook):
    url, received = webhook
    out = tmp_path / "events"
    config = _config(tmp_path, f"notify:\n  webhook_url: {url}\n  command: [sh, -c, 'cat > {out}']\n")
    secrets.register("hunter2-notify-secret")
    plugin.notify(Event("deploy.rolled_back", "v3 failed with password hunter2-notify-secret", "critical",
                        {"version": "v3"}), config)
    content_type, body = received[0]
    assert content_type == "application/json"
    assert body["kind"] == "deploy.rolled_back" and body["details"] == {"version": "v3"}
    assert body["text"].startswith("[dbdeck critical]") and "hunter2" not in json.dumps(body)
    assert json.loads(out.read_text())["kind"] == "deploy.rolled_back"


def test_below_min_severity_nothing_is_sent(tmp_path, webhook):
    url, received = webhook
    config = _config(tmp_path, f"notify:\n  webhook_url: {url}\n  min_severity: warning\n")
    plugin.notify(Event("deploy.succeeded", "ok"), config)
    plugin.notify(Event("failover.promoted", "promoted", "warning"), config)
    assert [body["kind"] for _, body in received] == ["failover.promoted"]


def test_a_dead_webhook_or_failing_command_never_raises(tmp_path, caplog):
    from dbdeck.plugins.sandbox.servers import free_port

    config = _config(tmp_path, f"notify:\n  webhook_url: http://127.0.0.1:{free_port()}/x\n  command: ['false']\n"
                               f"  timeout_s: 1\n")
    plugin.notify(Event("sync.failed", "x", "critical"), config)
    assert "webhook" in caplog.text and "command failed" in caplog.text


def test_bad_url_is_a_config_error(tmp_path):
    from dbdeck.errors import ConfigError

    with pytest.raises(ConfigError, match="webhook_url"):
        _config(tmp_path, "notify:\n  webhook_url: ftp://x\n")
