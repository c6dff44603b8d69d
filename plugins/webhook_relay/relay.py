"""The relay: answer each webhook with the primary's response; mirror a copy to dev, fire-and-forget.

The mirror never sits on the primary path: a request is queued (bounded; when full the copy is
dropped and logged) and sent by worker threads with the seed's timeout. Only the headers the seed
replicates (x-hub-signature-256, content-type) go to dev, plus x-replicated-from / x-replicated-at.
Log lines are the seed's: "Webhook replicated to dev environment", "Failed to replicate webhook to
dev environment", "Dev environment unavailable for webhook replication". Bodies are never logged.
"""

import http.client
import json
import logging
import queue
import socket
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

log = logging.getLogger("dbdeck.webhook_relay")

# RFC 9110 7.6.1: meaningful for one connection only, never forwarded
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "host", "content-length"}
MIRRORED_HEADERS = ("x-hub-signature-256", "content-type")


class Target:
    """Where requests go. A URL with a path (the seed's DEV_WEBHOOK_URL) receives every request at
    that path; a bare scheme://host:port receives each request at its own path."""

    def __init__(self, url):
        parts = urlsplit(url)
        self.url = url
        self.https = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.https else 80)
        self.fixed_path = parts.path if parts.path not in ("", "/") else None
        self.fixed_query = parts.query

    def path_for(self, request_path):
        if not self.fixed_path:
            return request_path
        query = urlsplit(request_path).query or self.fixed_query
        return self.fixed_path + (f"?{query}" if query else "")

    def send(self, method, request_path, body, headers, timeout):
        """(status, reason, headers, body) of one request; raises OSError/HTTPException on failure."""
        connection_class = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        connection = connection_class(self.host, self.port, timeout=timeout)
        try:
            connection.request(method, self.path_for(request_path), body=body,
                               headers={**headers, "Host": f"{self.host}:{self.port}"})
            response = connection.getresponse()
            return response.status, response.reason, response.getheaders(), response.read()
        finally:
            connection.close()


def is_unavailable(exc):
    """Dev down, unreachable or too slow (the seed's "unavailable"), as opposed to a bad answer."""
    return isinstance(exc, OSError)  # refused, reset, DNS failure, timeout


class Mirror:
    def __init__(self, target, timeout_ms, queue_size, workers):
        self.target = target
        self.timeout = timeout_ms / 1000
        self.pending = queue.Queue(maxsize=queue_size)
        self.dropped = 0
        self.workers = [threading.Thread(target=self._work, daemon=True, name=f"mirror-{n}") for n in range(workers)]

    def start(self):
        for worker in self.workers:
            worker.start()

    def submit(self, method, path, body, headers):
        kept = {name: value for name, value in headers.items() if name.lower() in MIRRORED_HEADERS}
        kept["x-replicated-from"] = "production"
        kept["x-replicated-at"] = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        try:
            self.pending.put_nowait((method, path, body, kept))
        except queue.Full:
            self.dropped += 1
            log.warning("Failed to replicate webhook to dev environment: %d copies already waiting, this one dropped",
                        self.pending.qsize())

    def _work(self):
        while True:
            method, path, body, headers = self.pending.get()
            started = time.monotonic()
            try:
                status, _, _, _ = self.target.send(method, path, body, headers, self.timeout)
            except Exception as exc:  # noqa: BLE001 - a mirror failure is logged, never raised
                if is_unavailable(exc):
                    log.warning("Dev environment unavailable for webhook replication: %s %s: %s",
                                method, path, describe_error(exc))
                else:
                    log.warning("Failed to replicate webhook to dev environment: %s %s: %s",
                                method, path, describe_error(exc))
                continue
            finally:
                self.pending.task_done()
            elapsed = (time.monotonic() - started) * 1000
            if 200 <= status < 300:
                log.info("Webhook replicated to dev environment: %s %s -> %d (%.0f ms)", method, path, status, elapsed)
            else:
                log.warning("Failed to replicate webhook to dev environment: %s %s -> HTTP %d", method, path, status)

    def drain(self, seconds):
        deadline = time.monotonic() + seconds
        while self.pending.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)


def describe_error(exc):
    text = str(exc) or type(exc).__name__
    return "timed out" if isinstance(exc, (socket.timeout, TimeoutError)) else text


class RelayServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, primary, mirror, settings):
        self.primary = primary
        self.mirror = mirror
        self.settings = settings
        super().__init__(address, RelayHandler)


class RelayHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "dbdeck-webhook-relay"

    def do_GET(self):  # noqa: N802 - http.server's naming
        self._relay()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    def _relay(self):
        started = time.monotonic()
        if self.path.split("?", 1)[0] == self.server.settings.health_path and self.command in ("GET", "HEAD"):
            self._health()
            return
        body = self._read_body()
        if body is None:
            return
        headers = {name: value for name, value in self.headers.items() if name.lower() not in HOP_BY_HOP}
        if self.server.mirror is not None and self.command in self.server.settings.mirror_methods:
            self.server.mirror.submit(self.command, self.path, body, headers)
        forwarded = self.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{forwarded}, {self.client_address[0]}" if forwarded else self.client_address[0]
        try:
            status, reason, response_headers, response_body = self.server.primary.send(
                self.command, self.path, body, headers, self.server.settings.primary_timeout_s)
        except Exception as exc:  # noqa: BLE001 - any primary failure is a 502 to the sender
            log.error("primary %s unavailable for %s %s: %s", self.server.primary.url, self.command, self.path,
                      describe_error(exc))
            self._answer(502, "Bad Gateway", [("Content-Type", "application/json")],
                         b'{"error": "primary unavailable"}')
            return
        self._answer(status, reason, [(n, v) for n, v in response_headers if n.lower() not in HOP_BY_HOP],
                     response_body)
        log.info("%s %s -> %d from primary (%.0f ms)", self.command, self.path, status,
                 (time.monotonic() - started) * 1000)

    def _read_body(self):
        limit = self.server.settings.max_body_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                total += size
                if total > limit:
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        else:
            length = int(self.headers.get("Content-Length") or 0)
            if length <= limit:
                return self.rfile.read(length) if length else b""
        self.close_connection = True
        self._answer(413, "Payload Too Large", [("Content-Type", "text/plain")],
                     f"body larger than {limit} bytes\n".encode())
        return None

    def _health(self):
        mirror = self.server.mirror
        report = {"status": "ok", "primary": self.server.primary.url,
                  "mirror": mirror.target.url if mirror else None,
                  "mirror_waiting": mirror.pending.qsize() if mirror else 0,
                  "mirror_dropped": mirror.dropped if mirror else 0}
        self._answer(200, "OK", [("Content-Type", "application/json")], json.dumps(report).encode())

    def _answer(self, status, reason, headers, body):
        self.send_response_only(status, reason)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 - http.server's signature
        log.debug("%s " + format, self.client_address[0], *args)
