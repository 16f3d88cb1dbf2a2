"""Network namespaces, bridges and veths of the lab, driven through `ip`.

Root namespace: one bridge (the lab's L2 segment, addressed .1). Each host is a
network namespace with a veth whose root side is a port of that bridge and
whose namespace side, `eth0`, is a port of the host's own bridge `br0` (the
host's address lives on `br0`; containers' veths join `br0` too, so all of
them share one L2 and a container keeps its IP when it moves between hosts).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
from collections.abc import AsyncIterator

import structlog

from corral.errors import FailedPrecondition
from corral.proc import run

log = structlog.get_logger("lab.network")

_IP_TIMEOUT = 10.0


@contextlib.asynccontextmanager
async def machine_lock(name: str = "corral-lab-network", timeout: float = 30.0) -> AsyncIterator[None]:
    """Serialise a check-then-create across processes on this machine (two labs
    must not pick the same free subnet). An abstract Unix socket name is the
    mutex: the kernel frees it when its holder exits, and it leaves no file."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    sock.bind("\0" + name)
                    break
                except OSError:  # held by another process
                    await asyncio.sleep(0.05)
        yield
    finally:
        sock.close()


async def list_namespaces() -> set[str]:
    result = await run(["ip", "-j", "netns", "list"], timeout=_IP_TIMEOUT)
    return {entry["name"] for entry in _json_list(result.stdout.decode())}


async def list_links(namespace: str | None = None) -> set[str]:
    result = await run([*_ip(namespace), "-j", "link", "show"], timeout=_IP_TIMEOUT)
    return {entry["ifname"] for entry in _json_list(result.stdout.decode())}


async def routed_networks() -> list[ipaddress.IPv4Network]:
    """IPv4 networks the root namespace already routes or has addresses in."""
    networks: list[ipaddress.IPv4Network] = []
    routes = await run(["ip", "-j", "-4", "route", "show", "table", "all"], timeout=_IP_TIMEOUT)
    for route in _json_list(routes.stdout.decode()):
        dst = route.get("dst")
        if not dst or dst == "default":
            continue
        try:
            networks.append(ipaddress.IPv4Network(dst, strict=False))
        except ValueError:
            continue  # "multicast", broadcast names and the like
    addrs = await run(["ip", "-j", "-4", "addr", "show"], timeout=_IP_TIMEOUT)
    for link in _json_list(addrs.stdout.decode()):
        for a in link.get("addr_info", []):
            if a.get("family") == "inet":
                networks.append(ipaddress.IPv4Network(f"{a['local']}/{a['prefixlen']}", strict=False))
    return networks


async def create_root_bridge(bridge: str, gateway: str, prefixlen: int) -> None:
    await run(["ip", "link", "add", bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0"],
              timeout=_IP_TIMEOUT)
    await run(["ip", "addr", "add", f"{gateway}/{prefixlen}", "dev", bridge], timeout=_IP_TIMEOUT)
    await run(["ip", "link", "set", bridge, "up"], timeout=_IP_TIMEOUT)
    log.debug("bridge created", bridge=bridge, address=gateway)


async def create_namespace(namespace: str) -> None:
    if namespace in await list_namespaces():
        raise FailedPrecondition(f"network namespace {namespace} already exists")
    await run(["ip", "netns", "add", namespace], timeout=_IP_TIMEOUT)


async def create_host_link(root_bridge: str, veth: str, namespace: str) -> None:
    """The veth pair: `veth` on the root bridge, its peer created as `eth0` inside `namespace`."""
    # The peer is created directly in the namespace, so the name eth0 never
    # meets the root namespace's own eth0.
    await run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace],
              timeout=_IP_TIMEOUT)
    await run(["ip", "link", "set", veth, "master", root_bridge], timeout=_IP_TIMEOUT)
    await run(["ip", "link", "set", veth, "up"], timeout=_IP_TIMEOUT)


async def configure_host_namespace(namespace: str, address: str, prefixlen: int, gateway: str,
                                   bridge: str) -> None:
    """Inside the host: lo up, `bridge` with eth0 in it, the host address on it, default route."""
    ip = _ip(namespace)
    await run([*ip, "link", "set", "lo", "up"], timeout=_IP_TIMEOUT)
    await run([*ip, "link", "add", bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0"],
              timeout=_IP_TIMEOUT)
    await run([*ip, "link", "set", "eth0", "master", bridge], timeout=_IP_TIMEOUT)
    # A bridge without a MAC of its own takes its lowest port's, and CRIU restores a container's
    # host-side veth with a random one (LXC's own start with fe:..., never the lowest): a live
    # migration in could change the host's MAC under its address and strand its peers' ARP
    # entries for seconds. Pinned, as a real host's bridge config does.
    links = json.loads((await run([*ip, "-j", "link", "show", "dev", "eth0"], timeout=_IP_TIMEOUT)).stdout)
    await run([*ip, "link", "set", bridge, "address", links[0]["address"]], timeout=_IP_TIMEOUT)
    await run([*ip, "addr", "add", f"{address}/{prefixlen}", "dev", bridge], timeout=_IP_TIMEOUT)
    await run([*ip, "link", "set", "eth0", "up"], timeout=_IP_TIMEOUT)
    await run([*ip, "link", "set", bridge, "up"], timeout=_IP_TIMEOUT)
    await run([*ip, "route", "add", "default", "via", gateway], timeout=_IP_TIMEOUT)


async def set_link_state(link: str, up: bool) -> None:
    await run(["ip", "link", "set", link, "up" if up else "down"], timeout=_IP_TIMEOUT)


async def link_is_up(link: str) -> bool | None:
    """True/False for an existing link (administratively up?), None if it does not exist."""
    result = await run(["ip", "-j", "link", "show", "dev", link], timeout=_IP_TIMEOUT, check=False)
    if result.returncode != 0:
        return None
    entries = _json_list(result.stdout.decode())
    return bool(entries) and "UP" in entries[0].get("flags", [])


async def delete_namespace(namespace: str) -> None:
    result = await run(["ip", "netns", "del", namespace], timeout=_IP_TIMEOUT, check=False)
    if result.returncode != 0 and namespace in await list_namespaces():
        log.warning("could not delete namespace", namespace=namespace, error=result.output)


async def delete_link(link: str) -> None:
    result = await run(["ip", "link", "del", link], timeout=_IP_TIMEOUT, check=False)
    if result.returncode != 0 and link in await list_links():
        log.warning("could not delete link", link=link, error=result.output)


def _ip(namespace: str | None) -> list[str]:
    return ["ip", "-n", namespace] if namespace else ["ip"]


def _json_list(text: str) -> list[dict]:
    # `ip -j` prints nothing at all (not "[]") when there is nothing to list.
    text = text.strip()
    if not text:
        return []
    value = json.loads(text)
    return value if isinstance(value, list) else []
