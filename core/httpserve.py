"""Small HTTP servers that no client can starve: the health checks HAProxy sends, /metrics for Prometheus.

They run inside processes whose own work matters more (auto-failover's monitor, a scheduler), so:
- at most `max_connections` are open at once; a new connection beyond that closes the oldest one, so
  idle or slow clients never hold the port shut for the checks that arrive next;
- a client has `timeout` seconds to send its request and take the answer;
- running out of file descriptors pauses accepting for a moment instead of spinning on accept();
- a client that hangs up early is one debug line (it is what HAProxy's checks do), never a traceback.
"""

from __future__ import annotations

import errno
import logging
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("dbdeck.http")

# the connection ended under us: the client hung up, or it was too slow and we closed it
_CLIENT_GONE = (ConnectionError, TimeoutError, socket.timeout)


class GuardedHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    # socketserver's backlog of 5 makes a burst of clients wait for SYN retries (1 s, 3 s...) before accept()
    request_queue_size = 512

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *, name: str = "http",
                 max_connections: int = 128, timeout: float = 5.0):
        self.name, self.max_connections, self.client_timeout = name, max_connections, timeout
        self._open: dict[socket.socket, float] = {}
        self._open_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    # --- accepting ---------------------------------------------------------------------------------
    def get_request(self) -> tuple[Any, Any]:
        try:
            connection, client = super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # accept() would fail at once again: without a pause the serving loop spins on a full table
                log.warning("%s: cannot accept a connection (%s); pausing for 0.5 s", self.name, exc.strerror)
                time.sleep(0.5)
            raise
        connection.settimeout(self.client_timeout)
        return connection, client

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            if len(self._open) >= self.max_connections:
                oldest = min(self._open, key=self._open.__getitem__)
                del self._open[oldest]
                log.debug("%s: %d connections open: closing the oldest", self.name, self.max_connections)
                _hang_up(oldest)
            self._open[request] = time.monotonic()
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.pop(request, None)
        super().shutdown_request(request)

    def open_connections(self) -> int:
        with self._open_lock:
            return len(self._open)

    # --- errors ------------------------------------------------------------------------------------
    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        client = client_address[0] if isinstance(client_address, tuple) else client_address
        if isinstance(exc, _CLIENT_GONE) or isinstance(exc, OSError) and exc.errno == errno.EBADF:
            log.debug("%s: client %s went away: %s", self.name, client, exc.__class__.__name__)
        else:
            log.warning("%s: request from %s failed: %s: %s", self.name, client, exc.__class__.__name__, exc)

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True,
                                  name=self.name)
        thread.start()
        return thread

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def _hang_up(connection: socket.socket) -> None:
    """End a connection another thread is serving: its read or write fails and that thread finishes."""
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class QuietHandler(BaseHTTPRequestHandler):
    """One debug line per request or client error, in dbdeck's log rather than on stderr."""

    server: GuardedHTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        log.debug("%s: %s %s", self.server.name, self.client_address[0], format % args)

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except _CLIENT_GONE as exc:  # writing the answer to a client that hung up
            log.debug("%s: client %s went away: %s", self.server.name, self.client_address[0],
                      exc.__class__.__name__)
            self.close_connection = True


def parse_address(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """[HOST]:PORT: an empty host is this machine only (127.0.0.1), the same rule for every --serve;
    [::1]:PORT for IPv6. Raises ValueError with the reason."""
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected [HOST]:PORT, got {text!r}")
    return host.strip("[]") or default_host, int(port)


def serve_metrics(registry: Any, address: tuple[str, int], name: str = "metrics") -> GuardedHTTPServer:
    """/metrics of a prometheus-client registry (Prometheus' text format), on a guarded server running in
    a thread; stop() ends it."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    class MetricsHandler(QuietHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                self.send_error(404, "try /metrics")
                return
            payload = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = GuardedHTTPServer(address, MetricsHandler, name=name)
    server.serve_in_thread()
    return server
