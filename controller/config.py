"""The controller's configuration file (YAML), read strictly."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from controller.health.liveness import HealthPolicy
from controller.network.ipam import AddressPool
from controller.scheduler.placement import PlacementPolicy, Strategy
from corral.model import Limits
from controller.scheduler.recovery import RecoveryPolicy
from corral.config import TlsFiles, load_document, parse_address
from corral.log import LOG_FILE_KEYS, LogFile, log_file_from, parse_level


@dataclass(frozen=True)
class ControllerConfig:
    @property
    def health(self) -> HealthPolicy:
        return HealthPolicy(suspect_after=self.heartbeat_timeout, lease=self.lease, margin=self.lease_margin)

    listen: tuple[str, ...]
    store_path: Path
    tls: TlsFiles
    heartbeat_timeout: float  # silence before a node is suspect
    heartbeat_interval: float
    lease: float  # a node's lease, renewed by each heartbeat
    lease_margin: float  # after the lease, before a node is dead (clock drift, scheduling)
    fence_command: tuple[str, ...]  # argv with {node}; run for a dead node, must exit 0 (() = none)
    fence_timeout: float
    recovery: RecoveryPolicy  # HA containers that stop unasked: restarts, relocations
    addresses: AddressPool
    placement: PlacementPolicy
    log_level: str
    metrics_listen: str | None = None  # HOST:PORT of /metrics (plain HTTP; README, Observing); None = off
    log_file: LogFile | None = None  # None: JSON lines on stderr (the journal)

    @classmethod
    def load(cls, path: Path) -> "ControllerConfig":
        doc = load_document(path)
        doc.check_keys({"listen", "store", "tls", "heartbeat_timeout", "heartbeat_interval", "lease", "lease_margin",
                        "fence_command", "fence_timeout", "ha_max_restart", "ha_max_relocate", "ha_restart_window",
                        "network", "placement", "log_level", "metrics_listen", *LOG_FILE_KEYS})  # fmt: skip
        listen = doc.get("listen", list)
        if not listen:
            raise doc.error("listen", "give at least one HOST:PORT to listen on")
        for item in listen:
            if not isinstance(item, str):
                raise doc.error("listen", f"expected HOST:PORT strings, got {item!r}")
            try:
                parse_address(item)
            except ValueError as exc:
                raise doc.error("listen", str(exc)) from None
        metrics = doc.get("metrics_listen", str, None, parse=parse_address)
        if metrics is not None and metrics in listen:
            raise doc.error("metrics_listen", f"{metrics} is a gRPC address of the controller (listen): "
                                              "give another port")  # fmt: skip
        store = doc.section("store")
        store.check_keys({"backend", "path"})
        backend = store.get("backend", str, "sqlite")
        if backend != "sqlite":
            raise store.error("backend", f"unknown backend {backend!r} (available: sqlite)")
        net = doc.section("network")
        net.check_keys({"subnet", "gateway", "range_start", "range_end"})
        try:
            addresses = AddressPool.parse(
                net.get("subnet", str), net.get("gateway", str, ""), net.get("range_start", str), net.get("range_end", str)
            )
        except Exception as exc:  # ConfigError without a line: give it one
            raise net.error(None, str(exc)) from None
        _check_addresses(net, addresses)
        timeout = doc.get("heartbeat_timeout", float, 5.0, parse=_finite)
        interval = doc.get("heartbeat_interval", float, 1.0)
        if not 0 < interval < timeout:
            raise doc.error("heartbeat_timeout", "must be longer than heartbeat_interval")
        lease = doc.get("lease", float, 5.0, parse=_finite)
        if not interval < lease:
            raise doc.error("lease", "must be longer than heartbeat_interval (each heartbeat renews it)")
        margin = doc.get("lease_margin", float, 2.0, parse=_finite)
        if margin < 0:
            raise doc.error("lease_margin", "must not be negative")
        if timeout >= lease + margin:
            raise doc.error("heartbeat_timeout", "must be shorter than lease + lease_margin (suspect before dead)")
        fence = doc.get("fence_command", list, [])
        if fence and (not all(isinstance(a, str) and a for a in fence) or not any("{node}" in a for a in fence)):
            raise doc.error("fence_command", "give the command as a list of strings, one of them with {node}")
        fence_timeout = doc.get("fence_timeout", float, 60.0, parse=_finite)
        if not 0 < fence_timeout <= 3600:
            raise doc.error("fence_timeout", "must be between 0 and 3600 seconds")
        recovery = RecoveryPolicy(
            max_restart=doc.get("ha_max_restart", int, 1, parse=_count),
            max_relocate=doc.get("ha_max_relocate", int, 1, parse=_count),
            restart_window=doc.get("ha_restart_window", float, 600.0, parse=_window),
        )
        placement = doc.section("placement", required=False)
        policy = PlacementPolicy()
        if placement is not None:
            placement.check_keys({"cpu_overcommit", "memory_overcommit", "strategy", "reserved_memory",
                                  "reserved_cpus", "keep_n_plus_1"})  # fmt: skip
            policy = PlacementPolicy(
                cpu_overcommit=placement.get("cpu_overcommit", float, policy.cpu_overcommit, parse=_overcommit),
                memory_overcommit=placement.get("memory_overcommit", float, policy.memory_overcommit,
                                                parse=_overcommit),  # fmt: skip
                strategy=placement.get("strategy", str, "spread", parse=_strategy),
                # Kept for the host itself: reserved_memory: 2G, reserved_cpus: 1 (or 500m).
                reserved=Limits(memory_bytes=placement.get("reserved_memory", object, 0, parse=_size),
                                cpu_millis=placement.get("reserved_cpus", object, 0, parse=_cpus)),  # fmt: skip
                keep_n_plus_1=placement.get("keep_n_plus_1", bool, False),
            )
        return cls(
            listen=tuple(listen),
            store_path=Path(store.get("path", str)),
            tls=TlsFiles.from_section(doc.section("tls")),
            heartbeat_timeout=timeout,
            heartbeat_interval=interval,
            lease=lease,
            lease_margin=margin,
            fence_command=tuple(fence),
            fence_timeout=fence_timeout,
            recovery=recovery,
            addresses=addresses,
            placement=policy,
            log_level=doc.get("log_level", str, "info", parse=parse_level),
            metrics_listen=metrics,
            log_file=log_file_from(doc),
        )


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")
    return value


def _strategy(value: str) -> Strategy:
    try:
        return Strategy(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a strategy (spread: the least loaded node; binpack: the most "
                         "loaded that fits)") from None


def _size(value: object) -> int:
    from corral.units import parse_size

    return parse_size(str(value), "reserved memory")


def _cpus(value: object) -> int:
    from corral.units import parse_cpus

    return parse_cpus(str(value))


def _count(value: int) -> int:
    if not 0 <= value <= 100:
        raise ValueError(f"must be between 0 and 100, got {value}")
    return value


def _window(value: float) -> float:
    if not math.isfinite(value) or not 0 < value <= 86400:
        raise ValueError(f"must be between 0 and 86400 seconds, got {value}")
    return value


def _overcommit(value: float) -> float:
    # .inf/.nan would crash placement later; 0 or less would refuse every request.
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a finite number above 0 (a multiple of the node's capacity), got {value}")
    return value


def _check_addresses(net, pool: AddressPool) -> None:
    """What AddressPool.parse lets through: a gateway off the subnet, and (from a /30 down) a
    range that takes in the network or broadcast address, which no container can use."""
    subnet = pool.subnet
    special = {subnet.network_address, subnet.broadcast_address} if subnet.prefixlen < 31 else set()
    if pool.gateway is not None:
        if pool.gateway not in subnet:
            raise net.error("gateway", f"{pool.gateway} is not inside the subnet {subnet}")
        if pool.gateway in special:
            raise net.error("gateway", f"{pool.gateway} is the network or broadcast address of {subnet}")
    for key, address in (("range_start", pool.first), ("range_end", pool.last)):
        if address in special:
            raise net.error(key, f"{address} is the network or broadcast address of {subnet}: "
                                 "containers cannot use it")  # fmt: skip
