"""corral-failoverd: the automatic failover daemon, a client of the controller's public API.

It decides *when*: when a node is fenced (proven off; a dead one may still run
its containers if its agent died with them), it asks the controller to fail that node's HA containers over, highest priority
first, and looks again every few seconds (a missed event, a controller restart,
a failover refused for lack of room). The controller decides *whether*: it
checks the node is lost, the container is not in doubt nor busy, and picks the
target, on every request, so a wrong or duplicated daemon cannot start a copy
twice. Several daemons may run: one acts at a time, holding the "failoverd" lease
(renewed every third of its ttl; it stops acting when it could not renew in time,
counting from when it asked). What to ask for is a pure decision
(`failover_requests`), and the clock is injectable: the scenario simulator
runs this daemon on simulated time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

import structlog

from corral import log as corral_log
from corral import systemd
from corral.errors import ConfigError, CorralError
from corral.model import Container, Node

log = structlog.get_logger("corral.failoverd")
T = TypeVar("T")

LEASE = "failoverd"
LOST = ("fenced",)  # a dead node is not enough: its containers may run until it is fenced
LEAD_MARGIN = 1.0  # seconds the leader stops acting before the controller's count of its lease ends


def lost_nodes(nodes: Iterable[Node]) -> list[str]:
    """The nodes whose HA containers this daemon asks to move: proven off."""
    return [n.facts.name for n in nodes if n.state.value in LOST]


def failover_requests(lost: Sequence[Container]) -> list[Container]:
    """Of the containers on lost nodes, those to ask a failover for, in the order to ask:
    HA and not in doubt (the controller would refuse it), highest priority first."""
    return sorted((c for c in lost if c.ha and not c.in_doubt), key=lambda c: (-c.ha_priority, c.name))


class FailoverDaemon:
    def __init__(self, client, holder: str, ttl: float = 10.0, sweep_every: float = 3.0,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.client = client
        self.holder = holder
        self.ttl = ttl
        self.sweep_every = sweep_every
        self.clock = clock
        self._leader_until = 0.0  # on `clock`
        self._wake = asyncio.Event()
        self._connected = False

    @property
    def leading(self) -> bool:
        return self.clock() < self._leader_until

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._keep_lease())
            tg.create_task(self._listen())
            tg.create_task(self._act())

    async def _keep_lease(self) -> None:
        while True:
            asked = self.clock()
            try:
                reply = await self.client.acquire_lease(LEASE, self.holder, self.ttl)
                if not self._connected:  # the controller answers, the watch runs: ready (Type=notify)
                    self._connected = True
                    systemd.ready(f"connected to the controller as {self.holder}")
                was = self.leading
                if reply.granted:
                    self._leader_until = asked + self.ttl - LEAD_MARGIN
                    if not was:
                        log.info("leading: this daemon acts on lost nodes", holder=self.holder)
                        self._wake.set()
                elif was or self._leader_until:
                    self._leader_until = 0.0
                    log.info("standing by: another daemon leads", leader=reply.holder)
            except CorralError as exc:
                log.warning("cannot reach the controller for the lease", error=exc.message)
            await asyncio.sleep(self.ttl / 3)

    async def _listen(self) -> None:
        """Node events wake the acting loop at once (it would look again soon anyway)."""
        since = 0
        while True:
            try:
                async for event in self.client.watch_events(since, follow=True):
                    since = event.seq
                    if event.kind == "node-state" and event.fields.get("state") in LOST:
                        self._wake.set()
            except CorralError as exc:
                log.info("event stream ended; watching again", error=exc.message)
                if "missed events" in exc.message:
                    since = 0
            await asyncio.sleep(1.0)

    async def _act(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.sweep_every):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if self.leading:
                try:
                    await self.sweep()
                except CorralError as exc:
                    log.warning("failover sweep failed", error=exc.message)

    async def sweep(self) -> int:
        """Ask for the failover of every HA container on a lost node; returns how many were asked."""
        on_lost = [ct for node in lost_nodes(await self.client.list_nodes())
                   for ct in await self.client.list_containers(node)]  # fmt: skip
        asked = 0
        for ct in failover_requests(on_lost):
            if not self.leading:
                break  # the lease lapsed meanwhile: another daemon may act now
            try:
                op = await self.client.failover(ct.name)
                asked += 1
                log.warning("failing over", container=ct.name, node=ct.node, op=op.id)
            except CorralError as exc:
                log.info("failover not started", container=ct.name, node=ct.node, why=exc.message)
        return asked


def _option(flag: str, parse: Callable[[str], T], value: str) -> T:
    try:
        return parse(value)
    except (ValueError, CorralError) as exc:
        raise ConfigError(f"{flag}: {exc.message if isinstance(exc, CorralError) else exc}") from None


def _whole(text: str) -> int:
    if not text.strip().isascii() or not text.strip().isdigit():
        raise ValueError(f"expected a whole number, got {text!r}")
    return int(text)


def log_file_of(args: argparse.Namespace) -> corral_log.LogFile | None:
    """The daemon's log file from its options (it has no config file of its own: the CLI's
    names the controller and its certificate); ConfigError (exit 78) naming a bad option."""
    path = _option("--log-file", corral_log.parse_log_path, args.log_file)
    max_bytes = _option("--log-max-bytes", corral_log.parse_max_bytes, args.log_max_bytes)
    backups = _option("--log-backups", lambda v: corral_log.parse_backups(_whole(v)), args.log_backups)
    return corral_log.LogFile(path, max_bytes, backups) if path is not None else None


def main(argv: list[str] | None = None) -> None:
    from controller.cli.settings import CliSettings
    from controller.client import ControllerClient
    from corral.certwatch import CertificateWatch
    from corral.version import VersionAction

    parser = argparse.ArgumentParser(prog="corral-failoverd", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="CLI config with the controller and a user certificate "
                        "(default: as corral's)")  # fmt: skip
    parser.add_argument("--context", help="the context of that config to use (default: its current one)")
    parser.add_argument("--holder", default=f"{socket.gethostname()}-{os.getpid()}", help="this daemon's id")
    parser.add_argument("--lease-ttl", type=float, default=10.0, help="seconds (default 10)")
    parser.add_argument("--log-level", default="info", help=f"{', '.join(corral_log.LEVELS)} (default info)")
    parser.add_argument("--log-file", default="", help="write the JSON lines to this file (absolute path) "
                        "instead of stderr (the journal)")  # fmt: skip
    parser.add_argument("--log-max-bytes", default="50M", help="with --log-file: rotate it at this size "
                        "(50M, 1G; 0: an external logrotate rotates it; default 50M)")  # fmt: skip
    parser.add_argument("--log-backups", default="5", help="with --log-file: rotated files kept (1-100, default 5)")
    parser.add_argument("--version", action=VersionAction)
    args = parser.parse_args(argv)
    try:
        corral_log.configure(json_output=True, level=_option("--log-level", corral_log.parse_level, args.log_level),
                             file=log_file_of(args))  # fmt: skip
    except CorralError as exc:
        print(f"corral-failoverd: error: {exc.message}", file=sys.stderr)
        sys.exit(exc.exit_code)

    async def serve() -> None:
        settings = CliSettings.load(args.config, args.context)
        async with ControllerClient(settings.controller, settings.tls, timeout=30) as client:
            daemon = FailoverDaemon(client, args.holder, ttl=args.lease_ttl)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            runner = asyncio.create_task(daemon.run())
            certificates = asyncio.create_task(CertificateWatch(settings.tls).run())  # its user certificate's end
            await stop.wait()
            systemd.stopping()
            runner.cancel()
            certificates.cancel()
            await asyncio.gather(runner, certificates, return_exceptions=True)

    try:
        asyncio.run(serve())
    except CorralError as exc:
        print(f"corral-failoverd: error: {exc.message}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
