"""The fleet's containers: what the controller does for each API request.

Records live in the store; the agents do the work on their hosts. Every
action on one container holds that container's lock in the controller, so
requests for the same container never interleave.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import replace
from typing import Mapping, Sequence

import structlog

from controller.agents import AgentClient, AgentPool
from controller.health.registry import NodeRegistry
from controller.network.ipam import AddressPool
from controller.operations.engine import Engine
from controller.operations.migrate import POST_COPY, SHARED_STORAGES as _SHARED_STORAGES, choose_strategy
from controller.model import Operation, OpState
from controller.scheduler.placement import PlacementPolicy, PlacementRequest, place
from controller.store.base import Store
from controller.vocabulary import STORAGE_NAMES, TEMPLATES, storage_driver
from corral.errors import AlreadyExists, CorralError, FailedPrecondition, InvalidArgument, NotFound
from corral.model import Container, ContainerState, Limits, Node, NodeState, validate_limits
from corral.names import validate_name
from corral.v1 import agent_pb2 as apb

log = structlog.get_logger("corral.controller.fleet")

STORAGES = STORAGE_NAMES  # local|shared, or a driver: dir|image|lvm (see controller/vocabulary.py)
# States the controller sets itself while it acts; heartbeats must not overwrite them.
_TRANSITIONAL = {ContainerState.CREATING, ContainerState.DESTROYING}


class Fleet:
    def __init__(
        self,
        store: Store,
        nodes: NodeRegistry,
        agents: AgentPool,
        addresses: AddressPool,
        policy: PlacementPolicy = PlacementPolicy(),
    ) -> None:
        self.store = store
        self.nodes = nodes
        self.agents = agents
        self.addresses = addresses
        self.policy = policy
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.engine: Engine | None = None  # set once the operations engine exists
        # Placement and address choice read then write: one at a time.
        self._placement_lock = asyncio.Lock()

    # -- nodes -------------------------------------------------------------

    async def list_nodes(self) -> list[Node]:
        containers = await self.store.list_containers()
        allocated: dict[str, tuple[Limits, int]] = {}
        for ct in containers:
            limits, count = allocated.get(ct.node, (Limits(), 0))
            allocated[ct.node] = (limits + ct.limits, count + 1)
        return self.nodes.with_allocations(self.nodes.all(), allocated)

    async def get_node(self, name: str) -> Node:
        validate_name(name, "node name")
        node = next((n for n in await self.list_nodes() if n.name == name), None)
        if node is None:
            raise NotFound(f"node {name!r} is not registered")
        return node

    def _agent_for(self, node_name: str) -> AgentClient:
        return self.agents.ready(self.nodes, node_name)

    # -- containers ----------------------------------------------------------

    def _not_busy(self, name: str) -> None:
        op = self.engine.active_for(name) if self.engine else None
        if op is not None:
            raise FailedPrecondition(f"container {name!r} is busy with operation {op.id} ({op.kind}, {op.state.value})")

    async def _record(self, name: str) -> Container:
        validate_name(name)
        record = await self.store.get_container(name)
        if record is None:
            raise NotFound(f"container {name!r} does not exist")
        return record

    def _observed(self, ct: Container) -> Container:
        node = self.nodes.get(ct.node)
        if ct.state not in _TRANSITIONAL and (node is None or node.state != NodeState.READY):
            return replace(ct, state=ContainerState.UNKNOWN, message=f"node {ct.node} is unreachable")
        return ct

    async def get(self, name: str) -> Container:
        record = self._observed(await self._record(name))
        if record.state in _TRANSITIONAL or record.state == ContainerState.UNKNOWN:
            return record
        live = await self._agent_for(record.node).get(name)
        return replace(record, state=live.state, init_pid=live.init_pid)

    async def list(self, node: str = "") -> list[Container]:
        if node:
            validate_name(node, "node name")
        return [self._observed(c) for c in await self.store.list_containers(node or None)]

    async def create(
        self, name: str, template: str, node: str, limits: Limits, storage: str, start: bool
    ) -> Container:
        validate_name(name)
        if template not in TEMPLATES:
            raise InvalidArgument(f"unknown template {template!r} (available: {', '.join(TEMPLATES)})")
        if storage_driver(storage) is None:
            raise InvalidArgument(f"unknown storage {storage!r} (available: {', '.join(STORAGES)})")
        if node:
            validate_name(node, "node name")
        validate_limits(limits)
        bound = log.bind(container=name)
        async with self._locks[name]:
            async with self._placement_lock:
                if await self.store.get_container(name) is not None:
                    raise AlreadyExists(f"container {name!r} already exists")
                nodes = await self.list_nodes()
                # The concrete driver: `shared` is the one the candidate nodes offer.
                storage = storage_driver(storage, [n.facts.storage_drivers for n in nodes
                                                   if n.state == NodeState.READY and (not node or n.name == node)])
                request = PlacementRequest(name, limits, node, storage)
                placement = place(request, nodes, self.policy)
                used = [c.network.ipv4 for c in await self.store.list_containers()]
                network = self.addresses.allocate(used)
                record = Container(
                    name=name, node=placement.node, template=template, state=ContainerState.CREATING,
                    limits=limits, network=network, storage=storage, created_at=time.time(),
                )  # fmt: skip
                await self.store.insert_container(record)
            bound.info("placing container", node=placement.node, reason=placement.reason, ip=network.ipv4)
            try:
                agent = self._agent_for(placement.node)
                created = await agent.create(name, template, limits, network, storage)
            except CorralError:
                await self.store.delete_container(name)
                raise
            record = replace(record, state=created.state, message=created.message)
            await self.store.update_container(record)
            if start:
                started = await agent.start(name)
                record = replace(record, state=started.state, init_pid=started.init_pid)
                await self.store.update_container(record)
            bound.info("container created", node=placement.node)
            return record

    async def start(self, name: str) -> Container:
        async with self._locks[name]:
            self._not_busy(name)
            record = await self._record(name)
            observed = await self._agent_for(record.node).start(name)
            return await self._save_observed(record, observed)

    async def stop(self, name: str, force: bool, timeout: int) -> Container:
        if timeout < 0 or timeout > 3600:
            raise InvalidArgument("stop timeout must be between 0 and 3600 seconds")
        async with self._locks[name]:
            self._not_busy(name)
            record = await self._record(name)
            observed = await self._agent_for(record.node).stop(name, force, timeout)
            return await self._save_observed(record, observed)

    async def destroy(self, name: str, force: bool) -> None:
        async with self._locks[name]:
            self._not_busy(name)
            record = await self._record(name)
            try:
                await self._agent_for(record.node).destroy(name, force)
            except NotFound:
                log.warning("container already gone from its node", container=name, node=record.node)
            await self.store.delete_container(name)
            log.info("container destroyed", container=name, node=record.node)

    async def exec(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], stdin: bytes, timeout: int
    ) -> apb.ExecResponse:
        if not argv:
            raise InvalidArgument("no command given to run")
        record = await self._record(name)
        return await self._agent_for(record.node).exec(name, argv, env, stdin, timeout)

    async def set_limits(self, name: str, limits: Limits) -> Container:
        validate_limits(limits)
        if limits == Limits():
            raise InvalidArgument("no limit given to change")
        async with self._locks[name]:
            self._not_busy(name)
            record = await self._record(name)
            # Only growth needs room on the node: check the increase like a placement.
            growth = Limits(
                memory_bytes=max(0, limits.memory_bytes - record.limits.memory_bytes),
                cpu_millis=max(0, limits.cpu_millis - record.limits.cpu_millis),
            )
            if growth != Limits():
                node = [n for n in await self.list_nodes() if n.name == record.node]
                place(PlacementRequest(name, growth, record.node, record.storage), node, self.policy)
            observed = await self._agent_for(record.node).set_limits(name, limits)
            return await self._save_observed(replace(record, limits=observed.limits), observed)

    async def migrate(
        self, name: str, target: str, *, live: bool, postcopy: bool, fallback_cold: bool, from_checkpoint: str = ""
    ) -> Operation:
        """Validate a migration request and hand it to the operations engine."""
        assert self.engine is not None
        validate_name(name)
        if not target:
            raise InvalidArgument("no target node given (--to NODE)")
        validate_name(target, "node name")
        if postcopy and not live:
            raise InvalidArgument("--postcopy is a kind of live migration: add --live")
        if fallback_cold and not live:
            raise InvalidArgument("--fallback cold only applies to --live migrations")
        if from_checkpoint:
            if postcopy or fallback_cold:
                raise InvalidArgument("--from-checkpoint restores a kept checkpoint: no --postcopy or --fallback")
            validate_name(from_checkpoint, "operation id")
        record = await self._record(name)
        if record.node == target:
            raise InvalidArgument(f"container {name!r} is already on node {target!r}")
        nodes = {n.name: n for n in await self.list_nodes()}
        source = nodes.get(record.node)
        if from_checkpoint:
            return await self._migrate_from_checkpoint(record, target, nodes, from_checkpoint)
        if source is None or source.state != NodeState.READY:
            raise FailedPrecondition(f"the source node {record.node!r} is not reachable: migration needs it")
        if target not in nodes:
            raise NotFound(f"node {target!r} is not registered")
        if postcopy and record.storage in _SHARED_STORAGES:
            # Its source serves pages until the last has moved, holding the volume the target needs to restore.
            raise FailedPrecondition(f"post-copy cannot move a container on {record.storage} storage (its volume "
                                     "changes hands before the restore): migrate it --live without --postcopy")  # fmt: skip
        # The target must have room for the container (its own share is already counted on the source).
        place(PlacementRequest(name, record.limits, target, record.storage), [nodes[target]], self.policy)
        strategy = "cold"
        if live:
            try:
                strategy = choose_strategy(source.facts.live_strategies, nodes[target].facts.live_strategies, postcopy)
            except FailedPrecondition as exc:
                reasons = "; ".join(
                    f"{n}: {why}" for n in (record.node, target)
                    for s, why in sorted(nodes[n].facts.live_unavailable.items()) if not postcopy or s == "post-copy"
                )  # fmt: skip
                raise FailedPrecondition(f"{exc.message}{' (' + reasons + ')' if reasons else ''}") from None
        params = {"source": record.node, "target": target, "live": live, "postcopy": postcopy,
                  "fallback_cold": fallback_cold, "strategy": strategy}  # fmt: skip
        return await self.engine.submit("migrate", name, params)

    async def _migrate_from_checkpoint(self, record: Container, target: str, nodes: dict[str, Node],
                                       kept_op: str) -> Operation:  # fmt: skip
        """Back to where a failed post-copy kept the container's checkpoint (see MigrationPlan)."""
        assert self.engine is not None
        op = await self.engine.get(kept_op)
        if op.kind != "migrate" or op.container != record.name or op.params.get("strategy") != POST_COPY:
            raise InvalidArgument(f"operation {kept_op} is not a post-copy migration of {record.name!r}")
        if op.state != OpState.FAILED or not op.params.get("kept_checkpoint"):
            raise FailedPrecondition(f"operation {kept_op} left no checkpoint of {record.name!r} "
                                     f"({op.state.value}{': ' + op.error if op.error else ''})")  # fmt: skip
        if record.node != op.params["target"]:
            raise FailedPrecondition(f"{record.name!r} has moved since operation {kept_op} (it is on {record.node!r})")
        if target != op.params["source"]:
            kept_on = op.params["source"]
            raise InvalidArgument(f"the checkpoint of {kept_op} is on node {kept_on!r}: --to {kept_on}")
        for node in (record.node, target):
            if node not in nodes or nodes[node].state != NodeState.READY:
                # Rule 1: its copy there must be proven stopped before the checkpoint runs.
                raise FailedPrecondition(f"node {node!r} is not reachable: it must be, to bring {record.name!r} back")
        params = {"source": record.node, "target": target, "live": True, "strategy": "from-checkpoint",
                  "from_checkpoint": kept_op}  # fmt: skip
        return await self.engine.submit("migrate", record.name, params)

    async def _save_observed(self, record: Container, observed: Container) -> Container:
        updated = replace(record, state=observed.state, init_pid=observed.init_pid, message=observed.message)
        await self.store.update_container(updated)
        return updated

    # -- reports from agents ---------------------------------------------------

    async def observe(self, node: str, reported: list[Container]) -> None:
        """Fold a node's report of its containers into the records (only changes are written)."""
        records = {c.name: c for c in await self.store.list_containers(node)}
        for ct in reported:
            record = records.get(ct.name)
            if record is None:
                log.warning("node reports a container the fleet has no record of", node=node, container=ct.name)
                continue
            busy = self.engine is not None and self.engine.active_for(ct.name) is not None
            if record.state in _TRANSITIONAL or self._locks[ct.name].locked() or busy:
                continue
            if record.state != ct.state:
                await self.store.update_container(replace(record, state=ct.state, init_pid=ct.init_pid))
