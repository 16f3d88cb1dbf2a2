"""The agent's configuration file (YAML), read strictly."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agent.watchdog import check_device
from corral.config import TlsFiles, load_document, parse_address
from corral.errors import CorralError
from corral.labels import check_labels
from corral.log import LOG_FILE_KEYS, LogFile, log_file_from, parse_level
from corral.names import validate_name


@dataclass(frozen=True)
class AgentConfig:
    node: str
    listen: str
    advertise: str
    controller: str
    lxc_path: Path
    state_dir: Path
    storage_dir: Path
    shared_dir: Path | None  # shared storage for the `image` driver (ext4 images, loop-mounted)
    shared_volume_group: str | None  # shared LVM volume group for the `lvm` driver (needs device-mapper)
    template_cache: Path
    bridge: str
    tls: TlsFiles
    heartbeat_interval: float
    log_level: str
    transfer_port: int
    watchdog_device: Path | None = None  # the kernel watchdog, petted while the lease holds (agent/watchdog.py)
    watchdog_timeout: int = 10  # seconds without a pet before the host is reset
    labels: dict[str, str] = field(default_factory=dict)  # the operator's, for placement constraints
    metrics_listen: str | None = None  # HOST:PORT of /metrics (plain HTTP; README, Observing); None = off
    log_file: LogFile | None = None  # None: JSON lines on stderr (the journal)
    # Live-migration pre-flight: also trial-dump a container holding at most this much (0: never).
    preflight_trial_max_bytes: int = 0
    # Incoming live migrations: a TLS endpoint for their memory images, on a free port of the
    # transfer address (agent/transfer/tls_stream.py); off: they come over the SSH transfer port.
    images_endpoint: bool = True
    # Incoming live migrations: page cache for the memory images written before the freeze, as
    # much as the pre-flight saw, at most half the available memory (agent/transfer/landing.py).
    images_landing: bool = True

    @classmethod
    def load(cls, path: Path) -> "AgentConfig":
        doc = load_document(path)
        doc.check_keys({
            "node", "listen", "advertise", "controller", "lxc_path", "state_dir", "storage_dir",
            "shared_dir", "shared_volume_group", "template_cache", "bridge", "tls", "heartbeat_interval", "log_level", "transfer_port",
            "watchdog_device", "watchdog_timeout", "labels", "metrics_listen", "preflight_trial_max_bytes",
            "images_endpoint", "images_landing",
            *LOG_FILE_KEYS,
        })  # fmt: skip
        listen = doc.get("listen", str, parse=parse_address)
        heartbeat = doc.get("heartbeat_interval", float, 1.0)
        if not 0.05 <= heartbeat <= 60:
            raise doc.error("heartbeat_interval", "must be between 0.05 and 60 seconds")
        shared = doc.get("shared_dir", str, None)
        volume_group = doc.get("shared_volume_group", str, None, parse=_volume_group)
        advertise = doc.get("advertise", str, listen, parse=parse_address)
        if is_wildcard(advertise):
            # Other hosts dial it (the controller, and sources for migrations' transfers).
            raise doc.error("advertise" if "advertise" in doc.values else "listen",
                            f"{advertise} is a wildcard address: set `advertise` to the HOST:PORT other "
                            "hosts reach this agent on")  # fmt: skip
        metrics = doc.get("metrics_listen", str, None, parse=parse_address)
        if metrics is not None and metrics == listen:
            raise doc.error("metrics_listen", f"{metrics} is the agent's gRPC address (listen): give another port")
        return cls(
            node=doc.get("node", str, parse=lambda v: validate_name(v, "node name")),
            listen=listen,
            advertise=advertise,
            controller=doc.get("controller", str, parse=parse_address),
            lxc_path=Path(doc.get("lxc_path", str, "/var/lib/corral/lxc")),
            state_dir=Path(doc.get("state_dir", str, "/var/lib/corral/agent")),
            storage_dir=Path(doc.get("storage_dir", str, "/var/lib/corral/storage")),
            shared_dir=Path(shared) if shared else None,
            shared_volume_group=volume_group or None,
            template_cache=Path(doc.get("template_cache", str, "/var/cache/corral/templates")),
            bridge=doc.get("bridge", str, "br0"),
            tls=TlsFiles.from_section(doc.section("tls")),
            heartbeat_interval=heartbeat,
            log_level=doc.get("log_level", str, "info", parse=parse_level),
            transfer_port=doc.get("transfer_port", int, 7702, parse=_port),
            watchdog_device=doc.get("watchdog_device", str, None, parse=lambda v: check_device(v) if v else None),
            watchdog_timeout=doc.get("watchdog_timeout", int, 10, parse=_watchdog_timeout),
            labels=doc.get("labels", dict, {}, parse=_labels),
            metrics_listen=metrics,
            log_file=log_file_from(doc),
            preflight_trial_max_bytes=doc.get("preflight_trial_max_bytes", object, 0, parse=_trial_max_bytes),
            images_endpoint=doc.get("images_endpoint", bool, True),
            images_landing=doc.get("images_landing", bool, True),
        )


def _volume_group(value: str) -> str:
    # LVM's own rule for VG names, minus what would confuse a path.
    if not value or len(value) > 127 or value.startswith("-") or value in (".", "..") or \
            not all(c.isalnum() or c in "._+-" for c in value):  # fmt: skip
        raise ValueError(f"{value!r} is not a volume group name (letters, digits, . _ + -; at most 127)")
    return value


def _labels(value: dict) -> dict[str, str]:
    try:
        return check_labels(value)
    except CorralError as exc:
        raise ValueError(exc.message) from None


def _trial_max_bytes(value) -> int:
    """A size (32M, 1G, 1048576) or 0 (never trial-dump)."""
    from corral.units import parse_size

    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 32M or 0, got {value!r}")
    if value == 0 or str(value).strip() == "0":
        return 0
    if str(value).strip().startswith("-"):
        raise ValueError(f"must not be negative, got {value}")
    return parse_size(str(value), "size")


def _watchdog_timeout(value: int) -> int:
    if not 2 <= value <= 600:
        raise ValueError(f"{value} is not between 2 and 600 seconds")
    return value


def host_of(address: str) -> str:
    """'host:port' or '[v6]:port' -> the host, without brackets."""
    host = address.rpartition(":")[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_wildcard(address: str) -> bool:
    return host_of(address) in ("", "0.0.0.0", "::", "*")


def _port(value: int) -> int:
    if not 0 < value < 65536:
        raise ValueError(f"{value} is not a TCP port")
    return value
