"""The executor's probes while it starts: `/healthz` and `/readyz` (503, naming what it waits for) answered from the
first moments of the process, before faust and the engine are imported, until the worker's web server takes over
the same listening socket (docs/operations.md). Standard library only, so it answers within a fraction of a second."""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# What /healthz says before the worker runs: alive, no runs, no partitions (the worker's own page has these fields).
_HEALTHY = {"status": "ok", "active_runs": 0, "partitions": [], "replaying": []}


class StartupProbes:
    """Serves the probes from a thread until `hand_over()` gives the listening socket to the worker's web server."""

    def __init__(self, host: str, port: int) -> None:
        self.checks: dict[str, str] = {
            "worker": "starting: importing faust and the engine",
            "kafka": "not tried yet",
            "partitions": "not assigned yet",
        }
        self._server = _Server((host, port), _handler(self.checks))
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="startup-probes", daemon=True)  # fmt: skip
        self._thread.start()
        self._handed_over = False

    def waiting(self, dependency: str, problem: str) -> None:
        """What /readyz names under `dependency` from now on ("ok" once it answers)."""
        self.checks[dependency] = problem

    def hand_over(self) -> socket.socket | None:
        """Stop answering and give the listening socket to the worker's web server (None after the first time).

        The socket stays open and listening, so a probe that arrives in between waits in its backlog for the new
        server instead of being refused."""
        if self._handed_over:
            return None
        self._handed_over = True
        self._server.shutdown()
        self._thread.join()
        return self._server.socket


class _Server(ThreadingHTTPServer):
    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self.address_family = socket.getaddrinfo(*address, type=socket.SOCK_STREAM)[0][0]
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer's own asks DNS for the host's full name, which a probe never uses: a start must not wait on DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


def _handler(checks: dict[str, str]) -> type[BaseHTTPRequestHandler]:
    class Probes(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.partition("?")[0]
            if path == "/healthz":
                self._json(200, _HEALTHY)
            elif path == "/readyz":
                self._json(503, {"status": "unavailable", "checks": dict(checks)}, {"Retry-After": "5"})
            else:
                self._json(404, {"status": "starting", "checks": dict(checks)})

        def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # probes every 0.1-2 s: not worth a log line
            pass

    return Probes
