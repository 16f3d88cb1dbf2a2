"""The interface every state backend implements (SQLite today; etcd keeps the same contract).

- Every method is one atomic change; `transaction()` groups several into one, all or nothing.
- Container records carry a revision. `update_container` and `delete_container` are
  compare-and-set on it: they apply only if the stored revision still equals the caller's,
  and raise `Conflict` otherwise, never overwriting silently. (etcd: a Txn comparing mod_revision.)
- Observed state (what a host reported) is written apart by `observe_container`: it never
  touches the desired state and does not raise the revision, so heartbeats cannot undo a change.
- Operations carry a revision too: `put_operation` never replaces a newer one by an older one,
  so a late progress write cannot overtake a step write.
- A failed write raises; nothing is reported committed that was not.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Protocol

from controller.model import Operation
from corral.model import Container, ContainerState, NetworkAttachment, NodeFacts


class StoreWriter(Protocol):
    """The changes a transaction may make (the store itself offers them one at a time)."""

    async def put_node(self, facts: NodeFacts) -> None: ...

    async def insert_container(self, container: Container) -> Container:
        """Add a record at revision 1; raises AlreadyExists if the name is taken."""
        ...

    async def update_container(self, container: Container) -> Container:
        """Write the record's desired state if the stored revision is `container.revision`;
        returns it at its new revision. Raises Conflict (stale) or NotFound (gone)."""
        ...

    async def observe_container(
        self, name: str, node: str, state: ContainerState, init_pid: int, at: float, message: str | None = None
    ) -> bool:
        """Record what `node` reports about `name`: only if the record says it lives there and
        the report is newer than the last one. Returns whether it was written."""
        ...

    async def delete_container(self, name: str, revision: int) -> None:
        """Remove the record if it is still at `revision` (Conflict otherwise)."""
        ...

    async def put_operation(self, op: Operation) -> None:
        """Write the operation unless the store already holds a newer revision of it."""
        ...

    async def put_unmanaged(self, node: str, name: str, network: NetworkAttachment, seen_at: float) -> None:
        """A container a host reports that the fleet has no record of (its address stays taken)."""
        ...

    async def forget_unmanaged(self, node: str, name: str) -> None: ...

    async def acquire_lease(self, name: str, holder: str, ttl: float, now: float) -> tuple[str, float]:
        """Take or renew the named lease for `holder` until now + ttl, if it is free, expired or
        already theirs; returns (the holder, when it expires) either way. (etcd: a lease + Txn.)"""
        ...

    async def get_container(self, name: str) -> Container | None: ...


class Store(StoreWriter, Protocol):
    # Grows with every committed change: what was read at one value is still true while it holds
    # (the controller's heartbeat path skips its reads in a quiet fleet).
    changes: int

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def transaction(self) -> AbstractAsyncContextManager[StoreWriter]:
        """One logical change: every write made through the yielded writer commits together."""
        ...

    async def list_nodes(self) -> list[NodeFacts]: ...

    async def set_cordoned(self, node: str, cordoned: bool) -> None:
        """Mark a registered node cordoned (no new placements) or not; NotFound if unknown."""
        ...

    async def cordoned_nodes(self) -> set[str]: ...

    async def list_containers(self, node: str | None = None) -> list[Container]: ...

    async def list_unmanaged(self) -> list[tuple[str, str, NetworkAttachment]]:
        """(node, name, network) of every container hosts report that the fleet has no record of."""
        ...

    async def get_operation(self, op_id: str) -> Operation | None: ...

    async def list_operations(self, container: str | None = None, active_only: bool = False) -> list[Operation]: ...
