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
from typing import Awaitable, Callable, Iterable

import structlog
from prometheus_client import REGISTRY, start_http_server
from prometheus_client.metrics_core import Metric

from corral.errors import Unavailable

log = structlog.get_logger("corral.metrics")

SCRAPE_TIMEOUT = 10.0  # seconds a scrape waits for the event loop's answer

Gather = Callable[[], Awaitable[Iterable[Metric]]]


class LoopCollector:
    """The families `gather` makes on `loop`, at each scrape (from the HTTP server's thread)."""

    def __init__(self, gather: Gather, loop: asyncio.AbstractEventLoop, timeout: float = SCRAPE_TIMEOUT) -> None:
        self.gather = gather
        self.loop = loop
        self.timeout = timeout

    def collect(self) -> Iterable[Metric]:
        try:
            return list(asyncio.run_coroutine_threadsafe(self.gather(), self.loop).result(self.timeout))
        except Exception:  # a scrape shows what it can; it never breaks the daemon
            log.exception("gathering metrics failed")
            return []


class MetricsServer:
    """`/metrics` on `address` (HOST:PORT) until `close`."""

    def __init__(self, address: str, gather: Gather) -> None:
        host, _, port = address.rpartition(":")
        self.collector = LoopCollector(gather, asyncio.get_running_loop())
        REGISTRY.register(self.collector)
        try:
            self._server, self._thread = start_http_server(int(port), host.strip("[]"), registry=REGISTRY)
        except OSError as exc:
            REGISTRY.unregister(self.collector)
            raise Unavailable(f"cannot serve metrics on {address}: {exc.strerror or exc}") from None
        log.info("metrics served", address=address, path="/metrics")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        REGISTRY.unregister(self.collector)
