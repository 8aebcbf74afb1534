"""A small threaded HTTP server that serves one registry at `/metrics`, off the gRPC port.

prometheus_client's `start_http_server` answers every path with metrics and offers no way to
stop; this one answers `/metrics` only (404 elsewhere), reports the port it bound (port 0 picks a
free one, which is how per-front servers on loopback are started) and can be closed. Content
negotiation (text 0.0.4 vs OpenMetrics, gzip) is prometheus_client's `make_wsgi_app`.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import CollectorRegistry

__all__ = ["METRICS_PATH", "MetricsHttpServer", "start_http_server"]

METRICS_PATH = "/metrics"

_StartResponse = Callable[..., Any]
_App = Callable[[dict[str, Any], _StartResponse], Iterable[bytes]]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one access-log line per scrape on stderr would break the JSON log stream


class MetricsHttpServer:
    """A running metrics endpoint; `close()` stops it and frees the port."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._httpd.server_port)

    @property
    def url(self) -> str:
        raw = self._httpd.server_address[0]
        host = raw.decode() if isinstance(raw, bytes) else str(raw)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}{METRICS_PATH}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5.0)


def _only_metrics(app: _App) -> _App:
    def wrapped(environ: dict[str, Any], start_response: _StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") != METRICS_PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found; metrics are at /metrics\n"]
        return app(environ, start_response)

    return wrapped


def start_http_server(
    registry: CollectorRegistry, port: int, host: str = "0.0.0.0"
) -> MetricsHttpServer:
    """Serve `registry` at http://host:port/metrics from a daemon thread."""

    class _Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    app = _only_metrics(make_wsgi_app(registry))
    httpd = make_server(host, port, app, _Server, handler_class=_QuietHandler)
    # close() waits up to one poll interval for serve_forever to notice the shutdown.
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True,
        name=f"metrics-http-{httpd.server_port}",
    )  # fmt: skip
    thread.start()
    return MetricsHttpServer(httpd, thread)
