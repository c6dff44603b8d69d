"""A stand-in backend: /api/health answers 200 with its version, or 503 when built with HEALTH_FAIL."""

import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).parent
VERSION = (HERE / "VERSION").read_text().strip() if (HERE / "VERSION").exists() else "unknown"
BROKEN = (HERE / "HEALTH_FAIL").exists() and (HERE / "HEALTH_FAIL").read_text().strip() == "1"


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        healthy = not BROKEN
        status = 200 if healthy or self.path != "/api/health" else 503
        body = json.dumps({"status": "ok" if healthy else "broken", "version": VERSION}).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        print(f"request {self.path} -> {args[1] if len(args) > 1 else ''}", flush=True)


print(f"sample backend {VERSION} listening on {os.environ['APP_PORT']}", flush=True)
ThreadingHTTPServer(("127.0.0.1", int(os.environ["APP_PORT"])), Handler).serve_forever()
