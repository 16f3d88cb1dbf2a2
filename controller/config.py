"""The controller's configuration file (YAML), read strictly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from controller.network.ipam import AddressPool
from controller.scheduler.placement import PlacementPolicy
from corral.config import TlsFiles, load_document, parse_address


@dataclass(frozen=True)
class ControllerConfig:
    listen: tuple[str, ...]
    store_path: Path
    tls: TlsFiles
    heartbeat_timeout: float
    heartbeat_interval: float
    addresses: AddressPool
    placement: PlacementPolicy
    log_level: str

    @classmethod
    def load(cls, path: Path) -> "ControllerConfig":
        doc = load_document(path)
        doc.check_keys({"listen", "store", "tls", "heartbeat_timeout", "heartbeat_interval", "network", "placement", "log_level"})
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
        timeout = doc.get("heartbeat_timeout", float, 5.0)
        interval = doc.get("heartbeat_interval", float, 1.0)
        if not 0 < interval < timeout:
            raise doc.error("heartbeat_timeout", "must be longer than heartbeat_interval")
        placement = doc.section("placement", required=False)
        policy = PlacementPolicy()
        if placement is not None:
            placement.check_keys({"cpu_overcommit", "memory_overcommit"})
            policy = PlacementPolicy(
                cpu_overcommit=placement.get("cpu_overcommit", float, policy.cpu_overcommit),
                memory_overcommit=placement.get("memory_overcommit", float, policy.memory_overcommit),
            )
        return cls(
            listen=tuple(listen),
            store_path=Path(store.get("path", str)),
            tls=TlsFiles.from_section(doc.section("tls")),
            heartbeat_timeout=timeout,
            heartbeat_interval=interval,
            addresses=addresses,
            placement=policy,
            log_level=doc.get("log_level", str, "info"),
        )
