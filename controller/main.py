"""`corral-controller --config FILE`: the fleet's controller."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import structlog

from controller.agents import AgentPool
from controller.config import ControllerConfig
from controller.events import EventBus
from controller.fleet import Fleet
from controller.health.fencing import Fencer
from controller.health.registry import NodeRegistry
from controller.metrics import ControllerMetrics
from controller.operations.engine import Engine
from controller.operations import operation_plans
from controller.service import ControllerServicer, controller_policy
from controller.store.sqlite import SqliteStore
from corral import log as corral_log
from corral import systemd
from corral.api.server import make_server
from corral.api.standard import add_standard_services
from corral.api.tls import server_credentials
from corral.certwatch import CertificateWatch
from corral.errors import CorralError, Unavailable
from corral.metrics import MetricsServer
from corral.v1 import controller_pb2_grpc

log = structlog.get_logger("corral.controller")


async def serve(config: ControllerConfig) -> None:
    store = SqliteStore(config.store_path)
    await store.open()
    events = EventBus()
    nodes = NodeRegistry(store, config.health, events)
    await nodes.load()
    agents = AgentPool(config.tls)
    engine = Engine(store, operation_plans(store, nodes, agents), events=events)
    fleet = Fleet(store, nodes, agents, config.addresses, engine, config.placement, config.recovery)

    server = make_server(controller_policy)
    standard = await add_standard_services(server, controller_policy)  # health, reflection
    controller_pb2_grpc.add_ControllerServiceServicer_to_server(
        ControllerServicer(fleet, nodes, engine, config.heartbeat_interval, events), server
    )
    credentials = server_credentials(config.tls)
    for address in config.listen:
        try:
            server.add_secure_port(address, credentials)
        except RuntimeError:
            raise Unavailable(f"cannot listen on {address} (in use, or not an address of this host)") from None
    await server.start()
    await engine.start()
    await standard.serving()
    metrics = ControllerMetrics(fleet, nodes, engine, events)
    server_of_metrics = MetricsServer(config.metrics_listen, metrics.gather) if config.metrics_listen else None
    log.info("controller serving", listen=list(config.listen), store=str(config.store_path))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Type=notify (deploy/systemd/); after the handlers: a stop asked for at once is a clean one.
    systemd.ready(f"serving on {', '.join(config.listen)}")
    try:
        async with asyncio.TaskGroup() as tg:
            watcher = tg.create_task(nodes.watch())
            counting = tg.create_task(metrics.follow())
            certificates = tg.create_task(CertificateWatch(config.tls).run())  # warns of their ends, daily
            fencer = tg.create_task(Fencer(nodes, config.fence_command, config.fence_timeout).run()) \
                if config.fence_command else None  # fmt: skip
            await stop.wait()
            log.info("controller stopping")
            systemd.stopping()
            await standard.stopping()
            watcher.cancel()
            counting.cancel()
            certificates.cancel()
            if server_of_metrics is not None:
                await asyncio.to_thread(server_of_metrics.close)
            if fencer is not None:
                fencer.cancel()
            await server.stop(grace=2)
    finally:
        await engine.close()
        await agents.close()
        await store.close()


def main(argv: list[str] | None = None) -> None:
    from corral.version import VersionAction

    parser = argparse.ArgumentParser(prog="corral-controller", description=__doc__)
    parser.add_argument("--version", action=VersionAction)
    parser.add_argument("--config", type=Path, default=Path("/etc/corral/controller.yaml"))
    parser.add_argument("--check-config", action="store_true", help="check the config and its certificates, "
                        "print `config OK: ...` or the error (exit 78); start nothing")  # fmt: skip
    args = parser.parse_args(argv)
    if args.check_config:
        sys.exit(systemd.check_config("corral-controller", args.config, ControllerConfig.load, lambda c: (
            systemd.Checked(c.tls, c.listen, "controller", "controller", f"listen {', '.join(c.listen)}, store "
                            f"{c.store_path}, network {c.addresses.subnet}, fence_command "
                            f"{' '.join(c.fence_command) or 'none'}{corral_log.describe(c.log_file)}"))))  # fmt: skip
    corral_log.configure(json_output=True)
    try:
        config = ControllerConfig.load(args.config)
        corral_log.configure(json_output=True, level=config.log_level, file=config.log_file)
        asyncio.run(serve(config))
    except CorralError as exc:
        print(f"corral-controller: {exc.message}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
