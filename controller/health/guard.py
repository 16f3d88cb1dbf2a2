"""The controller's failover guard, pure: may this container start elsewhere now?

A failover starts a copy of a container away from its node, so it is allowed
only once the old copy is proven unable to run (DESIGN rule 1): the container
is not in doubt, its disk is on shared storage (else it is lost with its node),
and its node is fenced (`liveness.why_not_lost`, given by the registry). Each
refusal says why. And when a node comes back holding a copy of a container that
now lives elsewhere: stopped, it is a leftover to remove; running, two copies
may run and the container is in doubt. The fleet applies these; the scenario
simulator runs the same functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from controller.operations.migrate import SHARED_STORAGES
from corral.model import Container, ContainerState


def in_doubt_refusal(record: Container, action: str) -> str | None:
    """Why `record` cannot `action` while in doubt (None: it is not in doubt)."""
    if not record.in_doubt:
        return None
    where = ", ".join(record.doubt_nodes) or record.node
    return (f"container {record.name!r} is in doubt ({record.in_doubt}): it may run on {where}. "
            f"It cannot {action} until that is settled: automatically when those nodes report, or "
            f"`corral ct resolve {record.name} --on NODE`")  # fmt: skip


def failover_refusal(record: Container, node_not_lost: str | None) -> str | None:
    """Why `record` may not fail over now, or None. `node_not_lost`: the registry's
    `why_not_lost(record.node)` (None once that node is fenced)."""
    if (doubt := in_doubt_refusal(record, "fail over")) is not None:
        return doubt
    if record.storage not in SHARED_STORAGES:
        return f"{record.name!r} is on {record.storage} storage: its disk is lost with its node"
    if node_not_lost is not None:
        return f"{record.name!r} cannot fail over: {record.node} is not proven unable to run it ({node_not_lost})"
    return None


class CopyVerdict(Enum):
    REMOVE = "remove"  # a stopped leftover of a container that lives elsewhere now
    DOUBT = "doubt"  # a running one: two copies may run; nothing starts it until settled


@dataclass(frozen=True)
class StaleCopy:
    verdict: CopyVerdict
    why: str


def stale_copy(node: str, record: Container, copy_state: ContainerState) -> StaleCopy | None:
    """What a copy of `record` that `node` reports means, when the record places it elsewhere
    (None: not a stale copy, or nothing to do about it yet)."""
    if record.node == node or record.storage not in SHARED_STORAGES or record.in_doubt:
        return None
    if copy_state == ContainerState.RUNNING:
        return StaleCopy(CopyVerdict.DOUBT, f"{node} came back running a copy of it, while it runs on {record.node}")
    if copy_state == ContainerState.STOPPED:
        return StaleCopy(CopyVerdict.REMOVE, f"the stopped copy left on {node} (it lives on {record.node})")
    return None
