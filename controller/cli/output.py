"""How the CLI prints: aligned tables for people, JSON for programs."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Sequence

from corral.model import Container, Node
from corral.units import format_cpus, format_size


def container_dict(ct: Container) -> dict[str, Any]:
    return {
        "name": ct.name,
        "state": ct.state.value,
        "node": ct.node,
        "template": ct.template,
        "ipv4": ct.network.ipv4,
        "mac": ct.network.mac,
        "storage": ct.storage,
        "init_pid": ct.init_pid,
        "limits": {
            "memory_bytes": ct.limits.memory_bytes,
            "cpu_millis": ct.limits.cpu_millis,
            "cpu_shares": ct.limits.cpu_shares,
            "pids_max": ct.limits.pids_max,
            "disk_bytes": ct.limits.disk_bytes,
        },
        "created_at": ct.created_at,
        "message": ct.message,
    }


def node_dict(node: Node) -> dict[str, Any]:
    f = node.facts
    return {
        "name": f.name,
        "state": node.state.value,
        "address": f.address,
        "cpus": f.cpus,
        "memory_bytes": f.memory_bytes,
        "memory_available_bytes": f.memory_available_bytes,
        "disk_bytes": f.disk_bytes,
        "disk_free_bytes": f.disk_free_bytes,
        "allocated": {"memory_bytes": node.allocated.memory_bytes, "cpu_millis": node.allocated.cpu_millis},
        "containers": node.container_count,
        "kernel": f.kernel,
        "lxc_version": f.lxc_version,
        "criu_version": f.criu_version,
        "criu_ok": f.criu_ok,
        "criu_detail": f.criu_detail,
        "storage_drivers": list(f.storage_drivers),
        "last_heartbeat": node.last_heartbeat,
    }


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table, box

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for h in headers:
        table.add_column(h, no_wrap=True)
    for row in rows:
        table.add_row(*[str(c) for c in row])
    Console(width=200).print(table)


def print_fields(fields: Sequence[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        print(f"{key + ':':<{width + 1}} {value}")


def nodes_table(nodes: Sequence[Node]) -> None:
    now = time.time()
    print_table(
        ["NAME", "STATE", "ADDRESS", "CPUS", "MEMORY", "ALLOCATED", "CONTAINERS", "CRIU", "LAST SEEN"],
        [
            [
                n.name,
                n.state.value,
                n.facts.address,
                n.facts.cpus,
                format_size(n.facts.memory_bytes),
                format_size(n.allocated.memory_bytes),
                n.container_count,
                n.facts.criu_version if n.facts.criu_ok else "no",
                f"{now - n.last_heartbeat:.0f}s ago" if n.last_heartbeat else "never",
            ]
            for n in nodes
        ],
    )


def containers_table(containers: Sequence[Container]) -> None:
    print_table(
        ["NAME", "STATE", "NODE", "TEMPLATE", "IPV4", "MEMORY", "CPUS"],
        [
            [
                c.name,
                c.state.value,
                c.node,
                c.template,
                c.network.ipv4 or "-",
                format_size(c.limits.memory_bytes),
                format_cpus(c.limits.cpu_millis),
            ]
            for c in containers
        ],
    )
