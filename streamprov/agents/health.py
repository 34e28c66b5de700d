"""HTTP endpoints for the orchestrator and Prometheus: `/healthz`, `/readyz`, `/metrics`, served by
every streamprov service (Validator, change detector, Recompute Manager).

stdlib `http.server` in a daemon thread: no web framework for three tiny GET endpoints. The handlers
only read state the loop publishes (callables that must be thread-safe and quick); they never touch
the Kafka clients, which belong to the loop's thread.

* `/healthz`: 200 while the process is alive and its loop keeps turning, else 503 (liveness probe);
* `/readyz`: 200 once the service can do its work (e.g. partitions assigned, views caught up);
* `/metrics`: Prometheus text.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
"""Content type of the Prometheus text exposition format."""

Probe = Callable[[], tuple[bool, str]]
"""Returns (ok, one line saying why)."""


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        routes = self.server.routes
        if path not in routes:
            self._send(404, "text/plain; charset=utf-8", f"not found; try {', '.join(sorted(routes))}\n")
            return
        try:
            status, content_type, body = routes[path]()
        except Exception:  # a probe must answer, even about its own failure
            log.exception("endpoint %s failed", path)
            status, content_type, body = 500, "text/plain; charset=utf-8", "internal error\n"
        self._send(status, content_type, body)

    def _send(self, status: int, content_type: str, body: str) -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s: " + format, self.address_string(), *args)


Route = Callable[[], tuple[int, str, str]]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    routes: dict[str, Route]


def probe_route(probe: Probe) -> Route:
    def route() -> tuple[int, str, str]:
        ok, why = probe()
        return (200 if ok else 503), "text/plain; charset=utf-8", f"{'ok' if ok else 'not ok'}: {why}\n"

    return route


def metrics_route(render: Callable[[], str]) -> Route:
    return lambda: (200, PROMETHEUS_TEXT, render())


class HttpEndpoints:
    """One HTTP server on (host, port) serving `routes`; port 0 picks a free one (see `port`)."""

    def __init__(self, host: str, port: int, routes: dict[str, Route]) -> None:
        self._server = _Server((host, port), _Handler)
        self._server.routes = routes
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name=f"http-{port}", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    def start(self) -> HttpEndpoints:
        self._thread.start()
        log.info("serving %s on http://%s:%d", ", ".join(sorted(self._server.routes)), self.host, self.port)
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)
