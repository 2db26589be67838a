"""Serves /healthz (liveness), /ready (readiness) and / on :8080, logging each request's path to stdout so the test
sees that the kubelet's probes ran; exits at once on SIGTERM (as PID 1 the default action would be ignored)."""

import http.server
import signal
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        print(f"GET {self.path} {self.headers.get('User-Agent', '')}", flush=True)

    def log_message(self, format: str, *args: object) -> None:
        pass


signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
