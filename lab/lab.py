"""Bring a lab up, take it down, report on it.

A lab named L with N hosts: a bridge `cl-L` (10.213.X.1/24) in the root
namespace, where the controller listens; per host a network namespace
`corral-L-nI` joined to it by a veth, with its own `br0`, address
10.213.X.(10+I), its own pinned mount namespace (hostns.py), LXC path,
storage directory and agent. Everything is recorded in base_dir/lab.json as it is created (see state.py) and named by
convention (see layout.py), so `lab_down` cleans up after any interruption.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

import structlog

from corral import pki
from corral.errors import FailedPrecondition, RuntimeFailure
from lab import configs, containers, faults, hostns, mounts, network, processes, readiness
from lab.hosts import enter_prefix, kill_host_processes, spawn_agent
from lab.controller import spawn_controller
from lab.layout import (
    HOST_BRIDGE,
    TEMPLATE_CACHE,
    Addressing,
    LabPaths,
    bridge_name,
    candidate_subnet_octets,
    is_lab_link,
    is_lab_namespace,
    namespace_name,
    node_name,
    resolve_base_dir,
    validate_lab_name,
    validate_nodes,
    veth_name,
)
from lab.state import HostState, LabInfo, LabState, build_info, state_lock

log = structlog.get_logger("lab")

_PREFIXLEN = 24


def lab_cli_config(name: str, base_dir: Path | None = None) -> Path:
    """Where the lab's CLI config (controller address, user certificate) is."""
    return LabPaths(resolve_base_dir(name, base_dir)).cli_config


# --- up -----------------------------------------------------------------------------


async def lab_up(
    name: str = "demo",
    nodes: int = 3,
    base_dir: Path | None = None,
    *,
    wait_ready: bool = True,
    ready_timeout: float = readiness.READY_TIMEOUT,
) -> LabInfo:
    """Create the lab's network, PKI and configs, start its controller and agents,
    and (with `wait_ready`) wait until the controller reports every node ready.
    On any failure, everything created is removed again (logs are kept in a
    temporary directory named in the error)."""
    validate_lab_name(name)
    validate_nodes(nodes)
    base = resolve_base_dir(name, base_dir)
    paths = LabPaths(base)
    await _ensure_absent(name, paths)

    state = LabState(name=name, base_dir=str(base), nodes=nodes,
                     hosts=[HostState(index=i, node=node_name(i)) for i in range(1, nodes + 1)])
    log.info("lab up", lab=name, nodes=nodes, base_dir=str(base))
    try:
        async with state_lock(base):
            await _create(state, paths)
        if wait_ready:
            await _wait_ready(state, paths, ready_timeout)
    except BaseException as e:
        kept = _keep_logs(name, paths)
        log.error("lab up failed, removing what it created", lab=name, error=str(e) or type(e).__name__)
        try:
            await lab_down(name, base)
        except Exception as down_error:  # report the original failure, not this one
            log.error("teardown after failed lab up also failed", lab=name, error=str(down_error))
        if isinstance(e, _NotReady):
            read = [str(kept.get(p, p)) for p in e.logs]
            raise RuntimeFailure(f"{e}; read {', '.join(read)}") from None
        raise
    info = await lab_status(name, base)
    assert info is not None
    return info


async def _ensure_absent(name: str, paths: LabPaths) -> None:
    hint = f"run `corral lab down {name}` first"
    if paths.state_file.exists():
        raise FailedPrecondition(f"lab {name} already exists ({paths.state_file}); {hint}")
    leftovers = sorted(ns for ns in await network.list_namespaces() if is_lab_namespace(name, ns))
    leftovers += sorted(link for link in await network.list_links() if is_lab_link(name, link))
    if leftovers:
        raise FailedPrecondition(f"leftovers of lab {name} exist ({', '.join(leftovers)}); {hint}")
    procs = await asyncio.to_thread(processes.find_marked, str(paths.base_dir))
    if procs:
        raise FailedPrecondition(
            f"processes of lab {name} are running (pids {', '.join(map(str, procs))}); {hint}")


async def _create(state: LabState, paths: LabPaths) -> None:
    name = state.name
    for d in (paths.base_dir, paths.pki_dir, paths.controller_dir, paths.shared_dir, TEMPLATE_CACHE):
        d.mkdir(parents=True, exist_ok=True)
    for h in state.hosts:
        hp = paths.host(h.index)
        for d in (hp.lxc_path, hp.state_dir, hp.storage_dir):
            d.mkdir(parents=True, exist_ok=True)
    state.save(paths.state_file)

    # Each resource is recorded before it is made: lab_down deletes only what exists.
    # Choosing the subnet and taking it (the bridge's address) is one step for
    # everyone on this machine, or two labs starting together could pick the same.
    async with network.machine_lock():
        state.octet = await free_subnet_octet(name)
        net = Addressing(state.octet)
        state.bridge = bridge_name(name)
        state.save(paths.state_file)
        await network.create_root_bridge(state.bridge, net.gateway, _PREFIXLEN)

    await asyncio.to_thread(_make_pki, paths, net, state.nodes)
    await hostns.prepare_pin_dir(paths.hostns_dir)
    for h in state.hosts:
        h.namespace = namespace_name(name, h.index)
        h.veth = veth_name(name, h.index)
        state.save(paths.state_file)
        await network.create_namespace(h.namespace)
        await network.create_host_link(state.bridge, h.veth, h.namespace)
        await network.configure_host_namespace(h.namespace, net.host_address(h.index), _PREFIXLEN,
                                               net.gateway, HOST_BRIDGE)
        # After the network: the host's /sys must show its br0.
        await hostns.create(h.namespace, paths.host(h.index).mount_ns)
    log.info("lab network ready", lab=name, bridge=state.bridge, subnet=str(net.subnet))

    configs.write_yaml(paths.controller_config, configs.controller_config(paths, net, name))
    for h in state.hosts:
        configs.write_yaml(paths.host(h.index).config, configs.agent_config(paths, net, h.index))
    cli = configs.cli_config(paths, net)
    configs.write_yaml(paths.cli_config, cli)  # the CLI adds it as a context of the user's config

    state.controller_pid = await spawn_controller(paths)
    state.save(paths.state_file)
    log.info("controller started", lab=name, pid=state.controller_pid, address=net.controller_address)
    for h in state.hosts:
        h.agent_pid = await spawn_agent(name, paths, h)
        state.save(paths.state_file)
        log.info("agent started", lab=name, node=h.node, pid=h.agent_pid)
    await _prefetch_debian_template(paths)


async def _prefetch_debian_template(paths: LabPaths) -> None:
    """Lab hosts cannot reach the outside: build the debian template from this
    namespace, in the background, into the cache the agents share (they wait)."""
    from agent.runtime.templates import DebianTemplate

    if DebianTemplate(TEMPLATE_CACHE).is_cached():
        return
    argv = [sys.executable, "-m", "agent.runtime.templates", "--cache", str(TEMPLATE_CACHE),
            "--owner", str(paths.base_dir), "debian"]  # fmt: skip
    pid = await processes.spawn_detached(argv, log_file=paths.base_dir / "template-debian.log", cwd=paths.base_dir)
    log.info("building the debian template in the background", pid=pid, cache=str(TEMPLATE_CACHE))


async def free_subnet_octet(name: str) -> int:
    """X for 10.213.X.0/24: the lab's stable choice unless something on this machine
    already routes or uses that /24 (another lab, a VPN...), then the next free one."""
    taken = await network.routed_networks()
    for octet in candidate_subnet_octets(name):
        if not any(Addressing(octet).subnet.overlaps(n) for n in taken):
            return octet
    raise FailedPrecondition("no free /24 left in 10.213.0.0/16 for a lab network")


def _make_pki(paths: LabPaths, net: Addressing, nodes: int) -> None:
    pki.init_ca(paths.pki_dir, common_name=f"Corral lab {paths.base_dir.name} CA")
    pki.issue(paths.pki_dir, "controller", "controller", hosts=[net.gateway, "127.0.0.1"])
    for i in range(1, nodes + 1):
        pki.issue(paths.pki_dir, "agent", node_name(i), hosts=[net.host_address(i)])
    pki.issue(paths.pki_dir, "user", "admin")


class _NotReady(RuntimeFailure):
    """Start-up failed; `logs` are the log files that tell why."""

    def __init__(self, message: str, logs: list[Path]) -> None:
        super().__init__(message)
        self.logs = logs


async def _wait_ready(state: LabState, paths: LabPaths, timeout: float) -> None:
    marker = str(paths.base_dir)
    dead: list[Path] = []

    def check_alive() -> str | None:
        if not processes.is_running(state.controller_pid, marker):
            dead.append(paths.controller_log)
            return "the controller exited during start-up"
        for h in state.hosts:
            if not processes.is_running(h.agent_pid, marker):
                dead.append(paths.host(h.index).log_file)
                return f"agent {h.node} exited during start-up"
        return None

    try:
        await readiness.wait_nodes_ready(paths.cli_config, [h.node for h in state.hosts],
                                         env=processes.daemon_env(), timeout=timeout, check_alive=check_alive)
    except RuntimeFailure as e:
        logs = dead or [paths.controller_log, *(paths.host(h.index).log_file for h in state.hosts)]
        raise _NotReady(f"lab {state.name} did not come up: {e}", logs) from None
    log.info("lab nodes ready", lab=state.name, nodes=state.nodes)


def _keep_logs(name: str, paths: LabPaths) -> dict[Path, Path]:
    """Copy the daemons' logs out of the lab directory before the teardown removes
    it; returns original -> copy."""
    logs = [paths.controller_log, *sorted(paths.hosts_dir.glob("*/agent.log"))]
    logs = [p for p in logs if p.is_file()]
    if not logs:
        return {}
    kept = Path(tempfile.mkdtemp(prefix=f"corral-lab-{name}-logs-"))
    copies = {}
    for p in logs:
        copies[p] = kept / ("controller.log" if p == paths.controller_log else f"{p.parent.name}-agent.log")
        shutil.copyfile(p, copies[p])
    return copies


# --- down ---------------------------------------------------------------------------


async def lab_down(name: str = "demo", base_dir: Path | None = None) -> None:
    """Remove everything of lab `name`: its processes, containers, mounts, namespaces,
    links and directory. Idempotent; needs neither a complete state file nor a
    complete lab. Touches only what carries this lab's names or base directory."""
    validate_lab_name(name)
    base = resolve_base_dir(name, base_dir)
    paths = LabPaths(base)
    marker = str(base)
    async with state_lock(base):
        state = LabState.load(paths.state_file)
        log.info("lab down", lab=name, base_dir=marker, state_file=state is not None)

        # 1. The daemons first, so nothing restarts containers behind our back.
        recorded = [state.controller_pid, *(h.agent_pid for h in state.hosts)] if state else []
        await asyncio.gather(*(processes.stop(pid, marker) for pid in recorded if pid))
        await _stop_marked(marker, monitors=False)

        # 2. Containers: a clean stop inside each host, then kill what is left,
        #    then anything else still running on a host (by its namespaces).
        all_ns = await network.list_namespaces()
        namespaces = {ns for ns in all_ns if is_lab_namespace(name, ns)}
        if state:
            namespaces |= {h.namespace for h in state.hosts if h.namespace and h.namespace in all_ns}
        indices = {i for i in map(_ns_index, namespaces) if i is not None}
        if paths.hosts_dir.is_dir():
            indices |= {i for i in (_dir_index(d) for d in paths.hosts_dir.iterdir()) if i is not None}
        pins = [paths.host(i).mount_ns for i in sorted(indices) if hostns.is_pinned(paths.host(i).mount_ns)]
        await asyncio.gather(*(
            containers.stop_all(enter_prefix(name, paths, i), paths.host(i).lxc_path)
            for i in sorted(indices) if namespace_name(name, i) in namespaces
        ))
        for i in sorted(indices):
            await containers.kill_all(paths.host(i).lxc_path)
        await _stop_marked(marker, monitors=True)
        await kill_host_processes(namespaces, pins)
        # Killed containers leave their (now empty) cgroups in the machine's hierarchies.
        for i in sorted(indices):
            await asyncio.to_thread(containers.remove_cgroups, paths.host(i).lxc_path)

        # 3. Mounts under the lab directory: inside each host, then here (which unpins the hosts).
        for pin in pins:
            await hostns.unmount_inside(pin, base)
        if base.exists():
            await mounts.unmount_all_under(base)

        # 4. Network: namespaces (takes their eth0 and so the veth pairs), links, bridge.
        for ns in sorted(namespaces):
            await network.delete_namespace(ns)
        links = {link for link in await network.list_links() if is_lab_link(name, link)}
        if state and state.bridge:
            links.add(state.bridge)
        for link in sorted(links, key=lambda l: l == bridge_name(name)):  # bridge last
            if link in await network.list_links():
                await network.delete_link(link)

        # 5. Files.
        await asyncio.to_thread(_remove_lab_dir, paths)
    log.info("lab removed", lab=name)


async def _stop_marked(marker: str, *, monitors: bool) -> None:
    pids = await asyncio.to_thread(processes.find_marked, marker)
    lxc_monitors = [p for p in pids if containers.is_monitor(p)]
    others = [p for p in pids if p not in lxc_monitors]
    if others:
        log.info("stopping leftover lab processes", pids=others)
        await asyncio.gather(*(processes.stop(p, marker) for p in others))
    if monitors and lxc_monitors:
        await containers.kill_monitors(lxc_monitors)


def _ns_index(namespace: str) -> int | None:
    tail = namespace.rsplit("-n", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _dir_index(host_dir: Path) -> int | None:
    tail = host_dir.name[1:]
    return int(tail) if host_dir.name.startswith("n") and tail.isdigit() else None


def _remove_lab_dir(paths: LabPaths) -> None:
    base = paths.base_dir
    if not base.is_dir():
        return
    still_mounted = mounts.mounts_under(base)
    if still_mounted:
        # Never rm -rf through a mount: it would delete the mounted filesystem's files.
        raise RuntimeFailure(f"cannot remove {base}: still mounted: {', '.join(map(str, still_mounted))}")
    for entry in LabPaths.OWNED_ENTRIES:
        p = base / entry
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    try:
        base.rmdir()
    except OSError:
        log.warning("lab directory not removed: it holds files the lab did not create", path=str(base))


# --- status -------------------------------------------------------------------------


async def lab_status(name: str = "demo", base_dir: Path | None = None) -> LabInfo | None:
    """The lab as recorded, with whether each process is alive, each host link up and
    each host's state (up, partitioned, agent-down, down); None if there is no such lab."""
    validate_lab_name(name)
    base = resolve_base_dir(name, base_dir)
    state = LabState.load(LabPaths(base).state_file)
    if state is None:
        return None
    marker = str(base)
    pids = [state.controller_pid, *(h.agent_pid for h in state.hosts)]
    running = {pid: processes.is_running(pid, marker) for pid in pids if pid}
    links = {h.veth: await network.link_is_up(h.veth) for h in state.hosts if h.veth}
    on_hosts = await faults.host_states(name, base)
    return build_info(state, running, links, {node: len(p.all) for node, p in on_hosts.items()})
