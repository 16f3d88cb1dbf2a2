"""Names, paths and addresses of a lab: pure functions, no side effects.

Everything a lab creates is named from the lab name so that `lab_down` can
find it again without the state file:
- bridge (root namespace):      cl-<lab>
- root side of host I's veth:   cl-<lab>-<I>
- host I's network namespace:   corral-<lab>-n<I>
- processes:                    their command line contains the lab's base dir
Interface names are limited to 15 characters, hence the short lab names.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from corral.errors import InvalidArgument

DEFAULT_ROOT = Path("/var/lib/corral-lab")
TEMPLATE_CACHE = Path("/var/cache/corral/templates")
CONTROLLER_PORT = 7700
AGENT_PORT = 7701
HOST_BRIDGE = "br0"  # the bridge inside each host namespace, containers attach here
MAX_NODES = 89  # host addresses are .11-.99; containers use .100-.250

_LAB_NAME_RE = re.compile(r"[a-z][a-z0-9]{0,5}")
_SUBNET_PREFIX = "10.213"

# The repository root (holds the corral/, agent/, controller/, lab/ packages); daemons
# get it on PYTHONPATH so `python -m agent.main` works from any directory.
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def validate_lab_name(name: str) -> str:
    if not isinstance(name, str) or not _LAB_NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"invalid lab name {name!r}: use 1-6 characters of a-z and 0-9, starting with a letter "
            "(interface names built from it are limited to 15 characters)"
        )
    return name


def validate_nodes(nodes: int) -> int:
    if not isinstance(nodes, int) or isinstance(nodes, bool) or not 1 <= nodes <= MAX_NODES:
        raise InvalidArgument(f"invalid number of lab nodes {nodes!r}: expected 1 to {MAX_NODES}")
    return nodes


def default_base_dir(name: str) -> Path:
    return DEFAULT_ROOT / validate_lab_name(name)


def resolve_base_dir(name: str, base_dir: Path | None) -> Path:
    validate_lab_name(name)
    if base_dir is None:
        return default_base_dir(name)
    path = Path(base_dir).absolute()
    if len(path.parts) < 3:
        # rm -rf of the lab must never come near / or a top-level directory.
        raise InvalidArgument(f"lab base directory {path} is too close to /: use a dedicated directory")
    return path


def node_name(index: int) -> str:
    return f"n{index}"


def node_index(node: str) -> int:
    m = re.fullmatch(r"n([1-9][0-9]*)", node)
    if not m:
        raise InvalidArgument(f"invalid lab node name {node!r}: expected n1, n2, ...")
    return int(m.group(1))


def bridge_name(lab: str) -> str:
    return f"cl-{lab}"


def veth_name(lab: str, index: int) -> str:
    return f"cl-{lab}-{index}"


def namespace_name(lab: str, index: int) -> str:
    return f"corral-{lab}-n{index}"


def is_lab_link(lab: str, link: str) -> bool:
    # Lab names have no '-', so "cl-hx-" can never match lab "hxy"'s links.
    return link == bridge_name(lab) or link.startswith(f"cl-{lab}-")


def is_lab_namespace(lab: str, ns: str) -> bool:
    prefix = f"corral-{lab}-n"
    return ns.startswith(prefix) and ns[len(prefix):].isdigit()


def preferred_subnet_octet(lab: str) -> int:
    """A stable (not per-process-randomised) choice of X in 10.213.X.0/24, 1..250."""
    digest = hashlib.sha256(lab.encode()).digest()
    return 1 + int.from_bytes(digest[:4], "big") % 250


def candidate_subnet_octets(lab: str) -> list[int]:
    first = preferred_subnet_octet(lab)
    return [1 + (first - 1 + k) % 250 for k in range(250)]


@dataclass(frozen=True)
class Addressing:
    """The lab's private /24: gateway .1 (root bridge), hosts .10+I, containers .100-.250."""

    octet: int

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"{_SUBNET_PREFIX}.{self.octet}.0/24")

    @property
    def gateway(self) -> str:
        return f"{_SUBNET_PREFIX}.{self.octet}.1"

    @property
    def range_start(self) -> str:
        return f"{_SUBNET_PREFIX}.{self.octet}.100"

    @property
    def range_end(self) -> str:
        return f"{_SUBNET_PREFIX}.{self.octet}.250"

    @property
    def controller_address(self) -> str:
        return f"{self.gateway}:{CONTROLLER_PORT}"

    def host_address(self, index: int) -> str:
        return f"{_SUBNET_PREFIX}.{self.octet}.{10 + index}"

    def agent_address(self, index: int) -> str:
        return f"{self.host_address(index)}:{AGENT_PORT}"


@dataclass(frozen=True)
class HostPaths:
    node: str
    dir: Path
    lxc_path: Path
    state_dir: Path
    storage_dir: Path
    config: Path
    log_file: Path
    mount_ns: Path  # the host's mount namespace is pinned (bind-mounted) here


@dataclass(frozen=True)
class LabPaths:
    base_dir: Path

    @property
    def state_file(self) -> Path:
        return self.base_dir / "lab.json"

    @property
    def pki_dir(self) -> Path:
        return self.base_dir / "pki"

    @property
    def controller_dir(self) -> Path:
        return self.base_dir / "controller"

    @property
    def controller_config(self) -> Path:
        return self.controller_dir / "controller.yaml"

    @property
    def controller_log(self) -> Path:
        return self.controller_dir / "controller.log"

    @property
    def controller_db(self) -> Path:
        return self.controller_dir / "state.db"

    @property
    def shared_dir(self) -> Path:
        return self.base_dir / "shared"

    @property
    def hosts_dir(self) -> Path:
        return self.base_dir / "hosts"

    @property
    def hostns_dir(self) -> Path:
        return self.base_dir / "hostns"

    @property
    def cli_config(self) -> Path:
        return self.base_dir / "cli.yaml"

    # Everything the lab itself puts in base_dir; lab_down removes only these,
    # so a mistaken base_dir never loses anything else.
    # What lab down removes: what lab up makes, the debian template build's log, and the lock
    # file the CLI leaves beside cli.yaml when a context of it is changed.
    OWNED_ENTRIES = ("lab.json", "lab.json.tmp", "pki", "controller", "shared", "hosts", "hostns", "cli.yaml",
                     ".cli.yaml.lock", "template-debian.log")

    def host(self, index: int) -> HostPaths:
        node = node_name(index)
        d = self.hosts_dir / node
        return HostPaths(
            node=node,
            dir=d,
            lxc_path=d / "lxc",
            state_dir=d / "agent",
            storage_dir=d / "storage",
            config=d / "agent.yaml",
            log_file=d / "agent.log",
            mount_ns=self.hostns_dir / node,
        )
