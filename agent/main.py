"""`corral-agent --config FILE`: serve one host's containers to the controller."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

import structlog

from agent.config import AgentConfig, host_of, is_wildcard
from agent.containers import ContainerManager
from agent.host_facts import HostFacts, bridge_mac_pinned
from agent.lease import Lease
from agent.membership import Membership
from agent.metrics import AgentMetrics
from agent.records import RecordStore
from agent.runtime.cgroups import CgroupLayout
from agent.runtime.lxc import LxcRuntime
from agent.service import AGENT_POLICY, AgentServicer
from agent.migration import Migrations
from agent.runtime.checkpoint import Checkpointer
from agent.storage.base import StorageDriver
from agent.storage.dir import DirStorage
from agent.storage import lvm
from agent.storage.image import ImageStorage
from agent.transfer import client as transfer_client
from agent.transfer.grants import GrantRegistry
from agent.transfer.server import TransferServer
from agent.watchdog import KernelWatchdog, Watchdog
from corral import log as corral_log
from corral import programs
from corral import systemd
from corral.api.server import make_server
from corral.api.standard import add_standard_services
from corral.api.tls import server_credentials
from corral.certwatch import CertificateWatch
from corral.errors import CorralError, Unavailable
from corral.metrics import MetricsServer
from corral.v1 import agent_pb2_grpc

log = structlog.get_logger("corral.agent")


async def serve(config: AgentConfig) -> None:
    await asyncio.to_thread(_make_private_dirs, config)
    storages: dict[str, StorageDriver] = {"dir": DirStorage(config.storage_dir)}
    unavailable: dict[str, str] = {}
    if config.shared_dir is not None:
        storages["image"] = ImageStorage(config.shared_dir, config.state_dir / "mounts", config.node)
    else:
        unavailable[programs.STORAGE_IMAGE] = "no shared_dir in the agent's configuration"
    if config.shared_volume_group is None:
        unavailable[programs.STORAGE_LVM] = "no shared_volume_group in the agent's configuration"
    elif (why := await lvm.unavailable_reason()) is not None:
        unavailable[programs.STORAGE_LVM] = f"volume group {config.shared_volume_group}: {why}"
        log.warning("shared LVM storage unavailable", volume_group=config.shared_volume_group, reason=why)
    else:
        storages["lvm"] = lvm.LvmStorage(config.shared_volume_group, config.state_dir / "mounts", config.node)
    containers = ContainerManager(
        node=config.node,
        runtime=LxcRuntime(config.lxc_path),
        storages=storages,
        records=RecordStore(config.state_dir),
        bridge=config.bridge,
        template_cache=config.template_cache,
        cgroups=CgroupLayout.detect(),
    )
    facts = HostFacts(config.node, config.advertise, config.storage_dir, tuple(storages), unavailable, config.labels)
    live = await facts.probe()
    if await asyncio.to_thread(bridge_mac_pinned, config.bridge) is False:
        log.warning("the containers' bridge has no MAC address of its own: containers migrated in can change "
                    "this host's MAC and strand its peers' ARP entries; set one (ip link set BRIDGE address MAC)",
                    bridge=config.bridge)  # fmt: skip
    await containers.reconcile()

    grants = GrantRegistry(config.state_dir / "staging")
    transfer_client.use_session_root(config.state_dir / "push")  # not /tmp: keys and mux sockets stay ours
    listen_host = config.listen.rpartition(":")[0]
    # Listening on a wildcard: sources dial the advertised host instead.
    advertise_host = host_of(config.advertise) if is_wildcard(config.listen) else None
    transfer = TransferServer(listen_host, config.transfer_port, config.state_dir / "ssh_host_ed25519_key", grants,
                              advertise_host=advertise_host)  # fmt: skip
    await transfer.start()
    migrations = Migrations(containers, transfer, grants, Checkpointer(config.lxc_path, network_lock=live.network_lock),
                            config.state_dir, preflight_trial_max_bytes=config.preflight_trial_max_bytes,
                            images_endpoint=config.images_endpoint, images_landing=config.images_landing)  # fmt: skip
    try:
        await migrations.sweep_leftovers()
    except Exception:  # tidiness: never a reason not to start
        log.exception("sweeping the leftovers of earlier operations failed")

    server = make_server(AGENT_POLICY)
    standard = await add_standard_services(server, AGENT_POLICY)  # health, reflection
    agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(containers, facts, migrations), server)
    try:
        server.add_secure_port(config.listen, server_credentials(config.tls))
    except RuntimeError:
        raise Unavailable(f"cannot listen on {config.listen} (in use, or not an address of this host)") from None
    await server.start()
    await standard.serving()  # up, registered or not (corral.api.standard)
    log.info("agent serving", node=config.node, listen=config.listen, lxc_path=str(config.lxc_path))

    lease = Lease(config.state_dir / "lease.json", containers.fence)
    watchdog = None
    if config.watchdog_device is not None:
        watchdog = Watchdog(KernelWatchdog(config.watchdog_device, config.watchdog_timeout), lease.valid,
                            config.watchdog_timeout)  # fmt: skip
    membership = Membership(config.controller, config.tls, facts, containers, config.heartbeat_interval, lease)
    metrics = None
    if config.metrics_listen is not None:  # README, Observing
        metrics = MetricsServer(config.metrics_listen, AgentMetrics(config.node, facts, containers).gather)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Type=notify (deploy/systemd/); after the handlers: a stop asked for at once is a clean one.
    systemd.ready(f"serving on {config.listen}")
    async with asyncio.TaskGroup() as tg:
        beat = tg.create_task(membership.run())
        guard = tg.create_task(lease.guard())
        petting = tg.create_task(watchdog.run()) if watchdog is not None else None
        sweeper = tg.create_task(migrations.run_sweeper())
        certificates = tg.create_task(CertificateWatch(config.tls).run())  # warns of their ends, daily
        # The fence at the data: re-check what is mounted here, beacons (agent/storage/beacons.py).
        image = storages.get("image")
        watchers = [tg.create_task(image.watch(containers.kill))] if isinstance(image, ImageStorage) else []
        await stop.wait()
        log.info("agent stopping; containers keep running")
        systemd.stopping()
        await standard.stopping()
        beat.cancel()
        guard.cancel()
        if petting is not None:
            petting.cancel()
        sweeper.cancel()
        certificates.cancel()
        for watcher in watchers:
            watcher.cancel()
        await server.stop(grace=2)
        if metrics is not None:
            await asyncio.to_thread(metrics.close)
        await migrations.close()
        await transfer.close()
        if watchdog is not None:
            watchdog.close()  # a clean stop: disarmed, no reset (a crash or a hang leaves it counting)


def _make_private_dirs(config: AgentConfig) -> None:
    """The containers are privileged (README, Privileges): a host user who could reach a rootfs,
    a template or a checkpoint could run its setuid files or read its memory. So every directory
    that holds them is root's alone, 0700 (root, LXC and CRIU need no more), also if it existed."""
    for d in (config.lxc_path, config.state_dir, config.storage_dir, config.template_cache):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(d, 0o700)


def main(argv: list[str] | None = None) -> None:
    from corral.version import VersionAction

    parser = argparse.ArgumentParser(prog="corral-agent", description=__doc__)
    parser.add_argument("--version", action=VersionAction)
    parser.add_argument("--config", type=Path, default=Path("/etc/corral/agent.yaml"))
    parser.add_argument("--check-config", action="store_true", help="check the config and its certificates, "
                        "print `config OK: ...` or the error (exit 78); start nothing")  # fmt: skip
    args = parser.parse_args(argv)
    if args.check_config:
        sys.exit(systemd.check_config("corral-agent", args.config, AgentConfig.load, lambda c: systemd.Checked(
            c.tls, [c.listen], "agent", c.node, f"node {c.node}, listen {c.listen}, advertise {c.advertise}, "
            f"controller {c.controller}, storage: dir{', image' if c.shared_dir else ''}"
            f"{', lvm' if c.shared_volume_group else ''}{corral_log.describe(c.log_file)}")))  # fmt: skip
    corral_log.configure(json_output=True)
    try:
        config = AgentConfig.load(args.config)
        corral_log.configure(json_output=True, level=config.log_level, file=config.log_file)
    except CorralError as exc:
        print(f"corral-agent: {exc.message}", file=sys.stderr)
        sys.exit(exc.exit_code)
    try:
        asyncio.run(serve(config))
    except CorralError as exc:
        log.error("agent failed", error=exc.message)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
