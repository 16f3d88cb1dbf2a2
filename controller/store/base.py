"""The interface every state backend implements."""

from __future__ import annotations

from typing import Protocol

from corral.model import Container, NodeFacts


class Store(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    # Nodes: what each registered host said about itself last time it registered.
    async def put_node(self, facts: NodeFacts) -> None: ...

    async def list_nodes(self) -> list[NodeFacts]: ...

    # Containers: the fleet's record of every container and where it lives.
    async def insert_container(self, container: Container) -> None:
        """Add a record; raises AlreadyExists if the name is taken."""
        ...

    async def update_container(self, container: Container) -> None: ...

    async def get_container(self, name: str) -> Container | None: ...

    async def list_containers(self, node: str | None = None) -> list[Container]: ...

    async def delete_container(self, name: str) -> None: ...
