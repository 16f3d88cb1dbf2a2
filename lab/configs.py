"""The configuration files the lab writes for the controller, the agents and the CLI."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from lab.layout import HOST_BRIDGE, TEMPLATE_CACHE, Addressing, LabPaths

HEARTBEAT_TIMEOUT = 5.0
HEARTBEAT_INTERVAL = 1.0
# /metrics (README, Observing): the controller's and each agent's gRPC host, these ports.
CONTROLLER_METRICS_PORT = 7709
AGENT_METRICS_PORT = 7708


def controller_config(paths: LabPaths, net: Addressing, name: str, *, fence: bool = True) -> dict[str, Any]:
    """`fence`: configure the lab's fence command (like a fleet with IPMI); without it the
    controller has no way to prove a silent host off, as a fleet without IPMI."""
    from lab.faults import fence_command

    pki = paths.pki_dir
    return {
        # Like a fleet with IPMI: a dead lab host is powered off (everything in it killed).
        **({"fence_command": fence_command(name, paths.base_dir)} if fence else {}),
        "listen": [net.controller_address],
        "store": {"backend": "sqlite", "path": str(paths.controller_db)},
        "tls": {
            "ca": str(pki / "ca.crt"),
            "cert": str(pki / "controller-controller.crt"),
            "key": str(pki / "controller-controller.key"),
        },
        "heartbeat_timeout": HEARTBEAT_TIMEOUT,
        "metrics_listen": f"{net.gateway}:{CONTROLLER_METRICS_PORT}",
        "network": {
            "subnet": str(net.subnet),
            "gateway": net.gateway,
            "range_start": net.range_start,
            "range_end": net.range_end,
        },
    }


def agent_config(paths: LabPaths, net: Addressing, index: int) -> dict[str, Any]:
    host = paths.host(index)
    pki = paths.pki_dir
    return {
        "node": host.node,
        "listen": net.agent_address(index),
        "controller": net.controller_address,
        "lxc_path": str(host.lxc_path),
        "state_dir": str(host.state_dir),
        "storage_dir": str(host.storage_dir),
        "shared_dir": str(paths.shared_dir),
        "template_cache": str(TEMPLATE_CACHE),
        "bridge": HOST_BRIDGE,
        "tls": {
            "ca": str(pki / "ca.crt"),
            "cert": str(pki / f"agent-{host.node}.crt"),
            "key": str(pki / f"agent-{host.node}.key"),
        },
        "heartbeat_interval": HEARTBEAT_INTERVAL,
        "metrics_listen": f"{net.host_address(index)}:{AGENT_METRICS_PORT}",
        # Two zones, so that placement constraints (--constraint zone=a) mean something in a lab.
        "labels": {"zone": "a" if index % 2 else "b"},
    }


def cli_config(paths: LabPaths, net: Addressing) -> dict[str, Any]:
    pki = paths.pki_dir
    return {
        "controller": net.controller_address,
        "tls": {
            "ca": str(pki / "ca.crt"),
            "cert": str(pki / "user-admin.crt"),
            "key": str(pki / "user-admin.key"),
        },
    }


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    # Nested maps in flow style ({a: b}), one top-level key a line, keys in the
    # order given, like the examples in the docs.
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=4096)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
