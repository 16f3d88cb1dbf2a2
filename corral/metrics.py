"""Prometheus `/metrics` for the daemons (config key `metrics_listen`, README, Observing).

Plain HTTP on the one address configured (bind it to a management network: the numbers name
containers and nodes), served by prometheus_client in a thread of its own. What is measured at
scrape time (node facts, container counters, the fleet's states) is gathered by a coroutine on
the daemon's event loop, so that it reads the daemon's state where the daemon keeps it, and a
scrape never touches that state from another thread. Counters and histograms updated as things
happen (heartbeats, operations) live in the default registry beside them, with the process's own.
"""

from __future__ import annotations

import asyncio
import socket
import socketserver
import threading
from typing import Awaitable, Callable, Iterable
from wsgiref.simple_server import make_server

import structlog
from prometheus_client import REGISTRY, Gauge, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler
from prometheus_client.metrics_core import Metric

from corral.errors import Unavailable

log = structlog.get_logger("corral.metrics")

SCRAPE_TIMEOUT = 10.0  # seconds a scrape waits for the event loop's answer

Gather = Callable[[], Awaitable[Iterable[Metric]]]

# Set by corral.certwatch in every daemon: its own certificate (certificate="own") and the CA
# certificates it trusts ("ca"). Alert on `corral_certificate_expiry_timestamp_seconds - time()`.
CERTIFICATE_EXPIRY = Gauge(
    "corral_certificate_expiry_timestamp_seconds", "When a certificate this daemon uses ends (Unix time)",
    ["certificate", "role", "name"],
)  # fmt: skip


class LoopCollector:
    """The families `gather` makes on `loop`, at each scrape (from the HTTP server's thread)."""

    def __init__(self, gather: Gather, loop: asyncio.AbstractEventLoop, timeout: float = SCRAPE_TIMEOUT) -> None:
        self.gather = gather
        self.loop = loop
        self.timeout = timeout

    def describe(self) -> Iterable[Metric]:
        # Without it the registry calls collect() when the collector is registered, from the
        # event loop's own thread: that waits on the loop it blocks (a 10 s stall at start-up).
        return []

    def collect(self) -> Iterable[Metric]:
        if _on_loop(self.loop):
            log.error("metrics gathered from the event loop's own thread: skipped (it would wait on itself)")
            return []
        try:
            return list(asyncio.run_coroutine_threadsafe(self.gather(), self.loop).result(self.timeout))
        except Exception:  # a scrape shows what it can; it never breaks the daemon
            log.exception("gathering metrics failed")
            return []


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class _QuickBindServer(ThreadingWSGIServer):
    """prometheus_client's server, bound without http.server's reverse DNS lookup of the address
    (socket.getfqdn): with no resolver reachable (an isolated network) it stalls the daemon ~10 s."""

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
        self.setup_environ()


def _serve(host: str, port: int) -> tuple[ThreadingWSGIServer, threading.Thread]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("MetricsHTTPServer", (_QuickBindServer,), {"address_family": family})
    httpd = make_server(host, port, make_wsgi_app(REGISTRY), server_class, handler_class=_SilentHandler)
    thread = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return httpd, thread


class MetricsServer:
    """`/metrics` on `address` (HOST:PORT) until `close`."""

    def __init__(self, address: str, gather: Gather) -> None:
        host, _, port = address.rpartition(":")
        self.collector = LoopCollector(gather, asyncio.get_running_loop())
        REGISTRY.register(self.collector)
        try:
            self._server, self._thread = _serve(host.strip("[]"), int(port))
        except OSError as exc:
            REGISTRY.unregister(self.collector)
            raise Unavailable(f"cannot serve metrics on {address}: {exc.strerror or exc}") from None
        log.info("metrics served", address=address, path="/metrics")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        REGISTRY.unregister(self.collector)
