"""The fleet's containers: what the controller does for each API request.

Records live in the store; the agents do the work on their hosts. Every path
that changes a container holds its lock (controller.locks) for as long as it
acts: a request finding it held gets a Conflict. Create, destroy and migrate
are operations (controller.operations); start, stop and limits are short calls.
Desired state changes only here and in operations, each a compare-and-set;
what hosts report is written beside it (`observe`).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import asdict, dataclass, replace
from typing import AsyncIterator, Mapping, Sequence

import structlog

from controller.agents import AgentClient, AgentPool
from controller.health.guard import CopyVerdict, StaleCopy, failover_refusal, in_doubt_refusal, stale_copy
from controller.health.registry import NodeRegistry
from controller.locks import ContainerLocks
from controller.model import Operation, OpState
from controller.network.ipam import AddressPool
from controller.operations.engine import Engine
from controller.operations.migrate import POST_COPY, SHARED_STORAGES as _SHARED_STORAGES, choose_strategy
from controller.operations.params import (
    CreateParams,
    DestroyParams,
    FailoverParams,
    MaintenanceParams,
    MigrateParams,
    StaleCopyParams,
)
from controller.operations.reach import Reach
from controller.operations.steps import OpKind
from controller.operations.maintenance import MovesPlan
from controller.scheduler.failover import plan_failover
from controller.scheduler.maintenance import (
    MovePlan,
    NodeCheck,
    check_n_plus_1,
    place_keeping_n_plus_1,
    plan_evacuation,
    plan_rebalance,
)
from controller.scheduler.placement import Placement, PlacementPolicy, PlacementRequest, Snapshot, decide, place
from controller.scheduler.recovery import RecoveryKind, RecoveryPolicy, keeps_running, recovery_for
from controller.store.base import Store
from controller.vocabulary import STORAGE_NAMES, TEMPLATES, storage_driver
from corral.errors import (
    AlreadyExists,
    Conflict,
    CorralError,
    FailedPrecondition,
    InvalidArgument,
    NoCapacity,
    NotFound,
    Unavailable,
)
from corral.model import Container, ContainerState, ContainerStats, DesiredState, Limits, Node, NodeState
from corral.model import Snapshot as ContainerSnapshot, validate_limits
from corral.labels import Constraint
from corral.exec_session import ExecInputEvent, ExecStart, validate_start
from corral.names import validate_name
from corral.api.client import call
from corral.api.convert import stats_from_pb
from corral.v1 import agent_pb2 as apb
from corral.proc import EXEC_MAX_TIMEOUT, Exited, Output, validate_command

log = structlog.get_logger("corral.controller.fleet")

STORAGES = STORAGE_NAMES  # local|shared, or a driver: dir|image|lvm (see controller/vocabulary.py)
# What an operation in progress shows as the container's state.
_PHASE_OF = {OpKind.CREATE: ContainerState.CREATING, OpKind.DESTROY: ContainerState.DESTROYING}
SETTLE_TIMEOUT = 10.0
STATS_TIMEOUT = 10.0  # each node's answer to a stats request
SETTLE_INTERVAL = 5.0  # at most one attempt per container this often (heartbeats come every second)


@dataclass(frozen=True)
class HaSettings:
    """Whether a container is highly available, and how it is placed when it fails over."""

    ha: bool = False
    priority: int = 0  # higher first
    group: str = ""  # containers of one group are kept on different nodes

    def check(self, storage: str) -> "HaSettings":
        if not 0 <= self.priority <= 1000:
            raise InvalidArgument(f"HA priority {self.priority} out of range 0..1000")
        if self.group:
            validate_name(self.group, "HA group")
        if self.ha and storage not in _SHARED_STORAGES:
            raise InvalidArgument(f"HA needs shared storage (--storage shared), not {storage}: a local disk "
                                  "is lost with its host, so the container could not run elsewhere")  # fmt: skip
        return self


@dataclass(frozen=True)
class PlacementWish:
    """Where a container may go: label constraints its node must meet, its anti-affinity group."""

    constraints: tuple[str, ...] = ()
    group: str = ""

    def check(self) -> "PlacementWish":
        parsed = tuple(str(Constraint.parse(c)) for c in self.constraints)
        if self.group:
            validate_name(self.group, "placement group")
        return PlacementWish(tuple(dict.fromkeys(parsed)), self.group)

    def request(self, name: str, limits: Limits, node: str, storage: str,
                exclude: frozenset[str] = frozenset()) -> PlacementRequest:  # fmt: skip
        return PlacementRequest(name, limits, node, storage, tuple(Constraint.parse(c) for c in self.constraints),
                                self.group, exclude)  # fmt: skip

    @classmethod
    def of(cls, record: Container) -> "PlacementWish":
        return cls(record.constraints, record.group)


@dataclass(frozen=True)
class NodeOrders:
    """What a node's agent learns of its HA containers with each heartbeat's reply."""

    ha: list[str]  # killed if its lease runs out
    keep_running: list[str]  # started again if they stop unasked (controller/scheduler/recovery.py)


@dataclass(frozen=True)
class Resolution:
    """What `ct resolve` does: keep the copy on `keep`, stop and remove those on `remove`."""

    name: str
    keep: str
    remove: tuple[str, ...]
    reason: str


class Fleet:
    def __init__(
        self,
        store: Store,
        nodes: NodeRegistry,
        agents: AgentPool,
        addresses: AddressPool,
        engine: Engine,
        policy: PlacementPolicy = PlacementPolicy(),
        recovery: RecoveryPolicy = RecoveryPolicy(),
    ) -> None:
        self.store = store
        self.nodes = nodes
        self.agents = agents
        self.addresses = addresses
        self.engine = engine
        self.reach = Reach(nodes, agents)  # any registered node's agent, whatever its heartbeats say
        self.locks: ContainerLocks = engine.locks
        self.policy = policy
        self.recovery = recovery
        self._recovering: set[str] = set()  # HA containers being relocated
        self._restarts: dict[str, int] = {}  # HA container -> restarts its host reports making lately
        self._stateful: set[str] = set()  # containers their host reports stopped with processes saved
        # node -> ((its report, store.changes, locks.changes), the orders answered) after a report
        # that called for nothing: the same report while nothing changed gets the same answer.
        self._quiet: dict[str, tuple[tuple, NodeOrders]] = {}
        # Placement and address choice read then write: one at a time.
        self._placement_lock = asyncio.Lock()
        self._settling: set[str] = set()
        self._settle_tried: dict[str, float] = {}  # container -> monotonic time of the last attempt
        self._tasks: set[asyncio.Task] = set()
        # Evacuations and rebalances are plans of migrations: their plans need the fleet itself.
        engine.plans[OpKind.EVACUATE] = lambda op: MovesPlan(op, store, self, engine)
        engine.plans[OpKind.REBALANCE] = lambda op: MovesPlan(op, store, self, engine)

    # -- nodes -------------------------------------------------------------

    async def list_nodes(self) -> list[Node]:
        containers = await self.store.list_containers()
        allocated: dict[str, tuple[Limits, int]] = {}
        for ct in containers:
            limits, count = allocated.get(ct.node, (Limits(), 0))
            allocated[ct.node] = (limits + ct.limits, count + 1)
        # A migration in progress holds room on its target too, so that two cannot fill it (review L4).
        by_name = {ct.name: ct for ct in containers}
        for op in self.engine.active(OpKind.MIGRATE) + self.engine.active(OpKind.FAILOVER):
            ct, target = by_name.get(op.container), str(op.params.get("target", ""))
            if ct is not None and ct.node != target:
                limits, count = allocated.get(target, (Limits(), 0))
                allocated[target] = (limits + ct.limits, count)
        unmanaged: dict[str, list[str]] = {}
        for node, name, _ in await self.store.list_unmanaged():
            unmanaged.setdefault(node, []).append(name)
        cordoned = await self.store.cordoned_nodes()
        return [replace(n, unmanaged_containers=tuple(unmanaged.get(n.name, ())), cordoned=n.name in cordoned)
                for n in self.nodes.with_allocations(self.nodes.all(), allocated)]  # fmt: skip

    async def get_node(self, name: str) -> Node:
        validate_name(name, "node name")
        node = next((n for n in await self.list_nodes() if n.name == name), None)
        if node is None:
            raise NotFound(f"node {name!r} is not registered")
        history = tuple(f"{time.strftime('%H:%M:%S', time.gmtime(e.at))} {e.message}"
                        for e in self.engine.events.recent(node=name))  # fmt: skip
        return replace(node, history=history)

    def _agent_for(self, node_name: str) -> AgentClient:
        return self.agents.ready(self.nodes, node_name)

    # -- containers ----------------------------------------------------------

    async def _record(self, name: str) -> Container:
        validate_name(name)
        record = await self.store.get_container(name)
        if record is None:
            raise NotFound(f"container {name!r} does not exist")
        return record

    @staticmethod
    def _refuse_in_doubt(record: Container, action: str) -> None:
        if (why := in_doubt_refusal(record, action)) is not None:
            raise FailedPrecondition(why)

    def _observed(self, ct: Container) -> Container:
        if ct.name in self._restarts:
            ct = replace(ct, ha_restarts=self._restarts[ct.name])
        if ct.name in self._stateful and ct.state == ContainerState.STOPPED:
            ct = replace(ct, stateful_stopped=True)
        op = self.engine.active_for(ct.name)
        if op is not None and op.kind in _PHASE_OF:
            return replace(ct, state=_PHASE_OF[OpKind(op.kind)])
        if ct.state == ContainerState.CREATING:
            return ct
        node = self.nodes.get(ct.node)
        if node is None or node.state != NodeState.READY:
            why = f"node {ct.node} is {node.state.value}" if node else f"node {ct.node} is not registered"
            return replace(ct, state=ContainerState.UNKNOWN, message=why)
        return ct

    async def get(self, name: str) -> Container:
        record = self._observed(await self._record(name))
        if record.in_doubt or record.state in (ContainerState.CREATING, ContainerState.DESTROYING,
                                               ContainerState.UNKNOWN):  # fmt: skip
            return record
        try:
            live = await self._agent_for(record.node).get(name)
        except NotFound:
            return replace(record, state=ContainerState.UNKNOWN, message=f"node {record.node} has no such container")
        except Unavailable as exc:  # not yet noticed as silent: show the record, say why it is not live
            return replace(record, state=ContainerState.UNKNOWN, message=exc.message)
        return replace(record, state=live.state, init_pid=live.init_pid, stateful_stopped=live.stateful_stopped)

    async def list(self, node: str = "") -> list[Container]:
        if node:
            validate_name(node, "node name")
        return [self._observed(c) for c in await self.store.list_containers(node or None)]

    async def stats(self, name: str = "", node: str = "",
                    timeout: float = STATS_TIMEOUT) -> tuple[list[ContainerStats], dict[str, str]]:  # fmt: skip
        """What containers use and how often they hit their limits: one container (its node's agent
        asked), or every container of the ready nodes (of `node` only, if given), all asked at once,
        each within `timeout`. Returns the stats, and why each node that did not answer did not (one
        container: its node's failure is raised). Copies a node holds that the fleet does not place
        there (a migration's other half, strays) are left out."""
        if name:
            targets = {(await self._record(name)).node: [name]}
        else:
            if node:
                validate_name(node, "node name")
            targets = {n.name: [] for n in self.nodes.all()
                       if n.state == NodeState.READY and node in ("", n.name)}  # fmt: skip

        async def ask(node_name: str, names: list[str]) -> list[ContainerStats]:
            agent = self._agent_for(node_name)
            reply = await call(agent.stub.GetContainerStats, apb.AgentContainerStatsRequest(names=names),
                               timeout=timeout, peer=agent.peer)  # fmt: skip
            return [stats_from_pb(s) for s in reply.stats]

        answers = await asyncio.gather(*(ask(n, names) for n, names in targets.items()), return_exceptions=True)
        if name:
            if isinstance(answers[0], BaseException):
                raise answers[0]
            return answers[0], {}
        placed = {(c.name, c.node) for c in await self.store.list_containers(node or None)}
        found, unanswered = [], {}
        for node_name, answer in zip(targets, answers):
            if isinstance(answer, CorralError):
                unanswered[node_name] = answer.message
            elif isinstance(answer, BaseException):
                raise answer
            else:
                found += [s for s in answer if (s.name, s.node) in placed]
        return sorted(found, key=lambda s: s.name), unanswered

    async def create(
        self, name: str, template: str, node: str, limits: Limits, storage: str, start: bool,
        ha: HaSettings = HaSettings(), wish: PlacementWish = PlacementWish(),
    ) -> Container:  # fmt: skip
        validate_name(name)
        wish = wish.check()
        if template not in TEMPLATES:
            raise InvalidArgument(f"unknown template {template!r} (available: {', '.join(TEMPLATES)})")
        if storage_driver(storage) is None:
            raise InvalidArgument(f"unknown storage {storage!r} (available: {', '.join(STORAGES)})")
        if node:
            validate_name(node, "node name")
        validate_limits(limits)
        async with self._placement_lock:
            if await self.store.get_container(name) is not None:
                raise AlreadyExists(f"container {name!r} already exists")
            nodes = await self.list_nodes()
            storage = self._concrete_storage(storage, node, nodes)
            ha.check(storage)
            placement = await self._decide(wish.request(name, limits, node, storage), ha.ha, nodes)
            network = self.addresses.allocate(await self._addresses_in_use())
            record = Container(
                name=name, node=placement.node, template=template, state=ContainerState.CREATING,
                limits=limits, network=network, storage=storage, created_at=time.time(),
                desired_state=DesiredState.RUNNING if start else DesiredState.STOPPED,
                ha=ha.ha, ha_priority=ha.priority, ha_group=ha.group,
                constraints=wish.constraints, group=wish.group,
            )  # fmt: skip
            params = CreateParams(placement.node, template, storage, start, limits.__dict__.copy())
            # The record (its address, its share of the node) and the operation commit together.
            op = await self.engine.submit(OpKind.CREATE, name, params.to_dict(),
                                          with_change=lambda tx: tx.insert_container(record))  # fmt: skip
        log.info("placing container", op=op.id, container=name, node=placement.node, reason=placement.reason,
                 ip=network.ipv4)  # fmt: skip
        await self.engine.outcome(op.id)
        return await self._record(name)

    @staticmethod
    def _concrete_storage(storage: str, node: str, nodes: Sequence[Node]) -> str:
        """The concrete driver: `shared` is the one the candidate nodes offer."""
        return storage_driver(storage, [n.facts.storage_drivers for n in nodes
                                        if n.state == NodeState.READY and (not node or n.name == node)])  # fmt: skip

    async def _snapshot(self, moving: str = "") -> Snapshot:
        """What placement needs beyond the nodes: the groups each node holds (but `moving`'s own
        place), and the cordoned nodes."""
        groups: dict[str, set[str]] = {}
        for ct in await self.store.list_containers():
            if ct.group and ct.name != moving:
                groups.setdefault(ct.node, set()).add(ct.group)
        return Snapshot({n: frozenset(g) for n, g in groups.items()}, frozenset(await self.store.cordoned_nodes()))

    async def _decide(self, request: PlacementRequest, ha: bool, nodes: list[Node]) -> Placement:
        """A new container's node: placement's decision, keeping N+1 where the policy says so."""
        snapshot = await self._snapshot()
        if not self.policy.keep_n_plus_1:
            return decide(request, nodes, self.policy, snapshot)
        return place_keeping_n_plus_1(request, ha, nodes, await self.store.list_containers(), self.policy, snapshot)

    async def plan_placement(self, name: str, *, existing: bool, node: str = "", limits: Limits = Limits(),
                             storage: str = "", wish: PlacementWish = PlacementWish()) -> Placement:  # fmt: skip
        """Where the scheduler would put a new container, or move `name` (existing): changes nothing."""
        validate_name(name)
        if node:
            validate_name(node, "node name")
        nodes = await self.list_nodes()
        if existing:
            record = await self._record(name)
            request = PlacementWish.of(record).request(name, record.limits, node, record.storage,
                                                       exclude=frozenset({record.node}))  # fmt: skip
            return decide(request, nodes, self.policy, await self._snapshot(moving=name))
        validate_limits(limits)
        if storage_driver(storage) is None:
            raise InvalidArgument(f"unknown storage {storage!r} (available: {', '.join(STORAGES)})")
        storage = self._concrete_storage(storage, node, nodes)
        return await self._decide(wish.check().request(name, limits, node, storage), False, nodes)

    async def cordon(self, node: str, cordoned: bool) -> Node:
        validate_name(node, "node name")
        await self.store.set_cordoned(node, cordoned)
        self.engine.events.emit("node-cordon", f"node {node} is {'cordoned: no new placements' if cordoned else 'uncordoned'}",
                                node=node, cordoned=cordoned)  # fmt: skip
        return await self.get_node(node)

    # -- maintenance -------------------------------------------------------------

    async def evacuate(self, node: str, *, allow_cold: bool, dry_run: bool) -> tuple[MovePlan, Operation | None]:
        """Move every container off `node` (cordoned first, and left cordoned: uncordon it after
        the maintenance), as an operation of migrations; `dry_run`: the plan only."""
        validate_name(node, "node name")
        nodes = await self.list_nodes()
        if node not in {n.name for n in nodes}:
            raise NotFound(f"node {node!r} is not registered")
        containers = await self.store.list_containers()
        plan = plan_evacuation(node, nodes, containers, self.policy, allow_cold=allow_cold,
                               cordoned=frozenset(await self.store.cordoned_nodes()))  # fmt: skip
        if dry_run:
            return plan, None
        if not any(n.cordoned for n in nodes if n.name == node):
            await self.cordon(node, True)
        params = MaintenanceParams(node, allow_cold, [asdict(m) for m in plan.moves], [asdict(s) for s in plan.stuck])
        return plan, await self.engine.submit(OpKind.EVACUATE, f"node:{node}", params.to_dict())

    async def rebalance(self, *, apply: bool, band: float = 0.15) -> tuple[MovePlan, Operation | None]:
        """The fewest live moves that bring node loads within `band` of the mean; `apply` starts them."""
        if not 0.01 <= band <= 1:
            raise InvalidArgument(f"band {band} out of range 0.01..1 (a fraction of a node's capacity)")
        plan = plan_rebalance(await self.list_nodes(), await self.store.list_containers(), self.policy, band=band,
                              cordoned=frozenset(await self.store.cordoned_nodes()))  # fmt: skip
        if not apply or not plan.moves:
            return plan, None
        params = MaintenanceParams("", False, [asdict(m) for m in plan.moves])
        return plan, await self.engine.submit(OpKind.REBALANCE, "fleet", params.to_dict())

    async def check(self) -> list[NodeCheck]:
        """N+1: for each node, would its HA containers fit on the others if it died now?"""
        return check_n_plus_1(await self.list_nodes(), await self.store.list_containers(), self.policy,
                              frozenset(await self.store.cordoned_nodes()))  # fmt: skip

    async def _addresses_in_use(self) -> list[str]:
        used = [c.network.ipv4 for c in await self.store.list_containers()]
        # Containers hosts report that the fleet has no record of keep theirs (a rebuilt controller).
        return used + [net.ipv4 for _, _, net in await self.store.list_unmanaged()]

    async def start(self, name: str, *, operator: bool = True, stateless: bool = False) -> Container:
        """`operator`: the operator's start, a fresh go for an HA container (not a relocation's).
        One stopped with its processes saved resumes them, unless `stateless` (they are dropped)."""
        validate_name(name)
        with self.locks.hold(name, "a start"):
            record = await self._record(name)
            self._refuse_in_doubt(record, "start")
            if operator and (record.ha_failed or record.ha_relocations):
                # The operator's start is a fresh go: its restarts and relocations count from zero.
                record = await self.store.update_container(replace(record, ha_failed="", ha_relocations=0))
            record = await self._want(record, DesiredState.RUNNING)
            agent = self._agent_for(record.node)
            if record.storage in _SHARED_STORAGES:
                # Its host may have let go of the volume (it fenced itself when it lost its lease):
                # take it again at the generation the record holds (a no-op while it is attached).
                await agent.attach_volume(f"start-{secrets.token_hex(4)}", name, record.volume_generation)
            observed = await agent.start(name, stateless=stateless)
            return await self._save_observed(record, observed)

    async def stop(self, name: str, force: bool, timeout: int, *, stateful: bool = False) -> Container:
        """`stateful`: save its processes on its node (CRIU) instead; the next start resumes them."""
        if timeout < 0 or timeout > 3600:
            raise InvalidArgument("stop timeout must be between 0 and 3600 seconds")
        validate_name(name)
        with self.locks.hold(name, "a stop"):
            record = await self._record(name)
            if not stateful:
                record = await self._want(record, DesiredState.STOPPED)
            # A stateful stop CRIU cannot make leaves the container running: its desired state
            # changes once the processes are saved (while this lock is held nothing restarts it).
            observed = await self._agent_for(record.node).stop(name, force, timeout, stateful=stateful)
            if stateful:
                record = await self._want(record, DesiredState.STOPPED)
            saved = await self._save_observed(record, observed)
            if stateful and observed.state == ContainerState.STOPPED and not observed.stateful_stopped:
                # Only an agent older than stateful stops ignores the flag (a rolling upgrade).
                raise FailedPrecondition(f"the agent on node {record.node!r} stopped {name!r} without saving its "
                                         "processes: it is too old for --stateful; upgrade it")  # fmt: skip
            return saved

    # -- snapshots (kept on the container's node: agent/snapshots.py) ------------------------

    async def create_snapshot(self, name: str, snapshot: str, stateful: bool) -> ContainerSnapshot:
        validate_name(name)
        validate_name(snapshot, "snapshot name")
        with self.locks.hold(name, "a snapshot"):
            record = await self._record(name)
            self._refuse_in_doubt(record, "be snapshotted")
            return await self._agent_for(record.node).create_snapshot(name, snapshot, stateful)

    async def list_snapshots(self, name: str) -> list[ContainerSnapshot]:
        validate_name(name)
        record = await self._record(name)
        return await self._agent_for(record.node).list_snapshots(name)

    async def restore_snapshot(self, name: str, snapshot: str) -> Container:
        validate_name(name)
        validate_name(snapshot, "snapshot name")
        with self.locks.hold(name, "a snapshot restore"):
            record = await self._record(name)
            self._refuse_in_doubt(record, "be restored")
            observed = await self._agent_for(record.node).restore_snapshot(name, snapshot)
            if observed.state == ContainerState.RUNNING:  # a stateful snapshot: its processes run again
                record = await self._want(record, DesiredState.RUNNING)
            return await self._save_observed(record, observed)

    async def delete_snapshot(self, name: str, snapshot: str) -> None:
        validate_name(name)
        validate_name(snapshot, "snapshot name")
        with self.locks.hold(name, "a snapshot removal"):
            record = await self._record(name)
            await self._agent_for(record.node).delete_snapshot(name, snapshot)

    async def _want(self, record: Container, desired: DesiredState) -> Container:
        if record.desired_state == desired:
            return record
        return await self.store.update_container(replace(record, desired_state=desired))

    async def destroy(self, name: str, force: bool) -> None:
        record = await self._record(name)
        self._refuse_in_doubt(record, "be destroyed")
        op = await self.engine.submit(OpKind.DESTROY, name, DestroyParams(record.node, force).to_dict())
        await self.engine.outcome(op.id)
        log.info("container destroyed", op=op.id, container=name, node=record.node)

    async def exec(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], stdin: bytes, timeout: int
    ) -> AsyncIterator[Output | Exited]:
        """Run a command in a container: its output as its agent streams it, then how it ended."""
        validate_command(argv, env)
        if not 0 <= timeout <= EXEC_MAX_TIMEOUT:
            raise InvalidArgument(f"exec timeout must be between 0 and {EXEC_MAX_TIMEOUT} seconds")
        record = await self._record(name)
        events = self._agent_for(record.node).exec(name, argv, env, stdin, timeout)
        async with contextlib.aclosing(events):
            async for event in events:
                yield event

    async def exec_interactive(
        self, start: ExecStart, inputs: AsyncIterator[ExecInputEvent]
    ) -> AsyncIterator[Output | Exited]:
        """An interactive exec, relayed to the container's agent both ways as it goes."""
        validate_start(start)
        record = await self._record(start.name)
        events = self._agent_for(record.node).exec_interactive(start, inputs)
        async with contextlib.aclosing(events):
            async for event in events:
                yield event

    async def set_limits(self, name: str, limits: Limits) -> Container:
        validate_limits(limits)
        if limits == Limits():
            raise InvalidArgument("no limit given to change")
        validate_name(name)
        with self.locks.hold(name, "a change of limits"):
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
            record = await self.store.update_container(replace(record, limits=observed.limits))
            return await self._save_observed(record, observed)

    async def set_ha(self, name: str, ha: HaSettings) -> Container:
        validate_name(name)
        with self.locks.hold(name, "a change of HA settings"):
            record = await self._record(name)
            ha.check(record.storage)
            return await self.store.update_container(replace(record, ha=ha.ha, ha_priority=ha.priority,
                                                             ha_group=ha.group))  # fmt: skip

    async def migrate(
        self, name: str, target: str, *, live: bool, postcopy: bool, fallback_cold: bool, from_checkpoint: str = ""
    ) -> Operation:
        """Validate a migration request and hand it to the operations engine."""
        validate_name(name)
        if target:
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
        self._refuse_in_doubt(record, "migrate")
        if record.node == target:
            raise InvalidArgument(f"container {name!r} is already on node {target!r}")
        if not target and from_checkpoint:
            raise InvalidArgument("--from-checkpoint needs the node the checkpoint is on (--to NODE)")
        async with self._placement_lock:  # room checked and held on the target at once
            if not target:
                target = (await self.plan_placement(name, existing=True)).node
            return await self._submit_migration(record, target, live, postcopy, fallback_cold, from_checkpoint)

    async def _submit_migration(self, record: Container, target: str, live: bool, postcopy: bool,
                                fallback_cold: bool, from_checkpoint: str) -> Operation:  # fmt: skip
        name = record.name
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
        # The target must have room for the container (its own share is already counted on the source),
        # and meet its constraints.
        request = PlacementWish.of(record).request(name, record.limits, target, record.storage)
        decide(request, [nodes[target]], self.policy, await self._snapshot(moving=name))
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
        params = MigrateParams(record.node, target, live=live, postcopy=postcopy, fallback_cold=fallback_cold,
                               strategy=strategy)  # fmt: skip
        return await self.engine.submit(OpKind.MIGRATE, name, params.to_dict())

    async def failover(self, name: str, target: str = "") -> Operation:
        """Run a container whose node is lost on another node (an operation). Refused unless that
        node is proven unable to run it: fenced, or silent past its lease and the margin (its agent
        has killed it: agent/lease.py). A suspect node is not a dead one."""
        validate_name(name)
        if target:
            validate_name(target, "node name")
        record = await self._record(name)
        if (why := failover_refusal(record, self.nodes.why_not_lost(record.node))) is not None:
            raise FailedPrecondition(why)
        async with self._placement_lock:
            nodes = await self.list_nodes()
            if target:
                place(PlacementRequest(name, record.limits, target, record.storage), nodes, self.policy)
                reason = "requested with --to"
            else:
                others = [c for c in await self.store.list_containers() if c.node != record.node]
                cordoned = frozenset(await self.store.cordoned_nodes())
                choice = plan_failover([record], nodes, others, self.policy, cordoned)[0]
                if choice.target is None:
                    raise NoCapacity(f"{name!r} cannot fail over: {choice.reason}")
                target, reason = choice.target, choice.reason
            params = FailoverParams(record.node, target, reason, record.volume_generation + 1)
            return await self.engine.submit(OpKind.FAILOVER, name, params.to_dict())

    async def _migrate_from_checkpoint(self, record: Container, target: str, nodes: dict[str, Node],
                                       kept_op: str) -> Operation:  # fmt: skip
        """Back to where a failed post-copy kept the container's checkpoint (see MigrationPlan)."""
        op = await self.engine.get(kept_op)
        kept = MigrateParams.of(op.params)
        if op.kind != OpKind.MIGRATE or op.container != record.name or kept.strategy != POST_COPY:
            raise InvalidArgument(f"operation {kept_op} is not a post-copy migration of {record.name!r}")
        if op.state != OpState.FAILED or not kept.kept_checkpoint:
            raise FailedPrecondition(f"operation {kept_op} left no checkpoint of {record.name!r} "
                                     f"({op.state.value}{': ' + op.error if op.error else ''})")  # fmt: skip
        if record.node != kept.target:
            raise FailedPrecondition(f"{record.name!r} has moved since operation {kept_op} (it is on {record.node!r})")
        if target != kept.source:
            raise InvalidArgument(f"the checkpoint of {kept_op} is on node {kept.source!r}: --to {kept.source}")
        for node in (record.node, target):
            if node not in nodes or nodes[node].state != NodeState.READY:
                # Rule 1: its copy there must be proven stopped before the checkpoint runs.
                raise FailedPrecondition(f"node {node!r} is not reachable: it must be, to bring {record.name!r} back")
        params = MigrateParams(record.node, target, live=True, strategy="from-checkpoint", from_checkpoint=kept_op)
        return await self.engine.submit(OpKind.MIGRATE, record.name, params.to_dict())

    async def _save_observed(self, record: Container, observed: Container) -> Container:
        now = time.time()
        await self.store.observe_container(record.name, record.node, observed.state, observed.init_pid, now,
                                           observed.message)  # fmt: skip
        (self._stateful.add if observed.stateful_stopped else self._stateful.discard)(record.name)
        return replace(record, state=observed.state, init_pid=observed.init_pid, message=observed.message,
                       observed_at=now, stateful_stopped=observed.stateful_stopped)  # fmt: skip

    # -- in doubt ------------------------------------------------------------------

    async def _holders(self, record: Container) -> dict[str, ContainerState | None]:
        """What each node that may hold a copy says of it (None: no copy there).
        Raises Unavailable if one cannot be asked: then nothing can be proven."""
        held: dict[str, ContainerState | None] = {}
        for node in dict.fromkeys((record.node, *record.doubt_nodes)):
            entry = self.nodes.get(node)
            if entry is None:
                held[node] = None
                continue
            try:
                async with asyncio.timeout(SETTLE_TIMEOUT):
                    held[node] = (await self.agents.client(entry.facts).get(record.name, wait_idle=True)).state
            except NotFound:
                held[node] = None
            except (Unavailable, TimeoutError) as exc:
                raise Unavailable(f"node {node} cannot be asked about {record.name!r}: {exc}") from None
        return held

    async def settle_doubt(self, name: str) -> bool:
        """Clear a container's doubt if the nodes that may hold it say enough: exactly one runs
        it (the record follows it), or none does (the record stays). True if settled."""
        record = await self.store.get_container(name)
        if record is None or not record.in_doubt or self.locks.holder(name) is not None:
            return False
        with self.locks.hold(name, "settling its doubt"):
            try:
                held = await self._holders(record)
            except Unavailable as exc:
                log.info("container still in doubt", container=name, why=exc.message)
                return False
            running = [n for n, state in held.items() if state == ContainerState.RUNNING]
            if len(running) > 1:
                log.error("container runs on more than one node: the operator must resolve it",
                          container=name, nodes=running)  # fmt: skip
                return False
            keep = running[0] if running else record.node
            if held.get(keep) is None:
                return False  # the record's node has no copy either: the operator must say which
            others = [n for n, state in held.items() if n != keep and state is not None]
            note = f"stopped copies left on {', '.join(others)}: `corral ct resolve` removes them" if others else ""
            await self.store.update_container(replace(record, node=keep, in_doubt="", doubt_nodes=(), message=note))
            self.engine.events.emit("container-doubt", f"{name} is settled on {keep} (its nodes answered)",
                                    container=name, node=keep, running=bool(running))  # fmt: skip
            return True

    async def plan_resolution(self, name: str, keep: str) -> Resolution:
        validate_name(keep, "node name")
        record = await self._record(name)
        if not record.in_doubt:
            raise FailedPrecondition(f"container {name!r} is not in doubt: nothing to resolve")
        held = await self._holders(replace(record, doubt_nodes=(*record.doubt_nodes, keep)))
        if held.get(keep) is None:
            have = ", ".join(n for n, s in held.items() if s is not None) or "no node"
            raise FailedPrecondition(f"node {keep!r} holds no copy of {name!r} (copies on: {have})")
        remove = tuple(n for n, state in held.items() if n != keep and state is not None)
        return Resolution(name, keep, remove, record.in_doubt)

    async def resolve(self, name: str, keep: str, dry_run: bool) -> Resolution:
        """Settle a container in doubt by the operator's word: its copy on `keep` is the one;
        every other copy is stopped and removed first (each node must answer)."""
        validate_name(name)
        with self.locks.hold(name, "a resolve"):
            plan = await self.plan_resolution(name, keep)
            if dry_run:
                return plan
            for node in plan.remove:
                agent = self.reach.agent(node)
                await agent.stop(name, True, 0)
                await agent.destroy(name, True)
                log.warning("removed a copy of a container in doubt", container=name, node=node)
            record = await self._record(name)
            await self.store.update_container(replace(record, node=keep, in_doubt="", doubt_nodes=(),
                                                      message=f"resolved by the operator: kept the copy on {keep}"))
            self.engine.events.emit("container-doubt", f"{name} is resolved by the operator: kept on {keep}",
                                    container=name, node=keep, removed=",".join(plan.remove))  # fmt: skip
            observed = await self.reach.agent(keep).get(name)
            await self._save_observed(replace(record, node=keep), observed)
            return plan

    # -- reports from agents ---------------------------------------------------

    async def observe(self, node: str, reported: list[Container]) -> NodeOrders:
        """Fold a node's report of its containers into the observed state (never the desired);
        returns what that node's agent is to know of its HA containers (for its lease).

        In a quiet fleet a node reports the same thing every second: while neither its report,
        the store nor the container locks changed since a report that called for nothing, the
        answer is the same and nothing is read (1,000 nodes heartbeat every second)."""
        key = tuple((c.name, c.state, c.init_pid, c.ha_restarts, c.stateful_stopped) for c in reported)
        quiet = self._quiet.get(node)
        if quiet is not None and quiet[0] == (key, self.store.changes, self.locks.changes):
            return quiet[1]
        self._quiet.pop(node, None)
        seen_at = (key, self.store.changes, self.locks.changes)
        records = {c.name: c for c in await self.store.list_containers(node)}
        known_unmanaged = {name for n, name, _ in await self.store.list_unmanaged() if n == node}
        acted = bool(known_unmanaged)
        now = time.time()
        for ct in reported:
            # A copy the record places elsewhere (a migration's, or one in doubt) is looked up alone: rare.
            record = records.get(ct.name) or await self.store.get_container(ct.name)
            if record is None:
                acted = True
                if ct.name not in known_unmanaged:
                    log.warning("node reports a container the fleet has no record of; its address stays "
                                "taken", node=node, container=ct.name, ip=ct.network.ipv4)  # fmt: skip
                    await self.store.put_unmanaged(node, ct.name, ct.network, now)
                continue
            if record.in_doubt and node in (record.node, *record.doubt_nodes):
                acted = True
                self._settle_soon(ct.name)
            if (verdict := stale_copy(node, record, ct.state)) is not None and self.locks.holder(ct.name) is None:
                acted = True
                await self._stale_copy(node, record, verdict)
            if record.node != node or self.locks.holder(ct.name) is not None:
                acted = True  # another node's record, or a request is acting on it (it writes what it saw)
                continue
            if record.state != ct.state or record.init_pid != ct.init_pid:
                await self.store.observe_container(ct.name, node, ct.state, ct.init_pid, now)
            (self._stateful.add if ct.stateful_stopped else self._stateful.discard)(ct.name)
            if ct.ha_restarts:
                self._restarts[ct.name] = ct.ha_restarts
            else:
                self._restarts.pop(ct.name, None)
            acted |= self._recover(record, ct)
        for gone in known_unmanaged - {ct.name for ct in reported}:
            await self.store.forget_unmanaged(node, gone)
        orders = NodeOrders(
            ha=sorted(name for name, record in records.items() if record.ha),
            keep_running=sorted(name for name, record in records.items()
                                if keeps_running(record) and self.locks.holder(name) is None),
        )  # fmt: skip
        if not acted and (seen_at[1], seen_at[2]) == (self.store.changes, self.locks.changes):
            self._quiet[node] = (seen_at, orders)
        return orders

    def _recover(self, record: Container, reported: Container) -> bool:
        """An HA container its host gave up restarting: moved to another node, or failed. True if
        something is (being) done about it."""
        decision = recovery_for(record, reported, self.recovery)
        if decision.kind == RecoveryKind.NOTHING:
            return False
        if record.name in self._recovering:
            return True
        self._recovering.add(record.name)

        async def recover() -> None:
            try:
                if decision.kind == RecoveryKind.RELOCATE:
                    await self._relocate(record.name, decision.reason)
                else:
                    await self._mark_failed(record.name, decision.reason)
            except CorralError as exc:
                log.warning("recovering an HA container failed", container=record.name, error=exc.message)
                self.engine.events.emit("ha-recovery-failed", f"recovering {record.name} failed: {exc.message}",
                                        container=record.name)  # fmt: skip
            finally:
                self._recovering.discard(record.name)

        task = asyncio.create_task(recover())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _relocate(self, name: str, why: str) -> None:
        """Move a stopped HA container to another ready node (a cold migration: its shared volume
        changes hands) and start it there; the relocation is counted before it begins."""
        record = await self._record(name)
        others = [c for c in await self.store.list_containers() if c.node != record.node]
        cordoned = frozenset(await self.store.cordoned_nodes())
        choice = plan_failover([record], await self.list_nodes(), others, self.policy, cordoned)[0]
        if choice.target is None:
            await self._mark_failed(name, f"{why}; no node can take it: {choice.reason}")
            return
        await self.store.update_container(replace(record, ha_relocations=record.ha_relocations + 1))
        self.engine.events.emit("ha-relocate", f"relocating {name} from {record.node} to {choice.target}: {why} "
                                f"({choice.reason})", container=name, node=record.node, target=choice.target)  # fmt: skip
        op = await self.migrate(name, choice.target, live=False, postcopy=False, fallback_cold=False)
        op = await self.engine.wait(op.id)
        if op.state != OpState.SUCCEEDED:
            raise FailedPrecondition(f"its move to {choice.target} did not succeed ({op.state.value}: {op.error})")
        await self.start(name, operator=False)

    async def _mark_failed(self, name: str, why: str) -> None:
        with self.locks.hold(name, "marking it failed"):
            record = await self._record(name)
            if not keeps_running(record):
                return
            await self.store.update_container(replace(record, ha_failed=why))
        log.error("HA container failed: it waits for the operator", container=name, why=why)
        self.engine.events.emit("ha-failed", f"{name} failed: {why}", container=name, node=record.node)

    async def _stale_copy(self, node: str, record: Container, copy: StaleCopy) -> None:
        """A node reports a copy of a shared-storage container that lives elsewhere (it was failed
        over while the node was lost): a stopped one is removed, as an operation; a running one
        puts the container in doubt (controller/health/guard.py decides which)."""
        if copy.verdict == CopyVerdict.DOUBT:
            await self.store.update_container(replace(record, in_doubt=copy.why, doubt_nodes=(node,)))
            self.engine.events.emit("container-doubt", f"{record.name} is in doubt: {copy.why}", container=record.name,
                                    node=node)  # fmt: skip
            return
        try:
            await self.engine.submit(OpKind.REMOVE_STALE_COPY, record.name, StaleCopyParams(node).to_dict())
        except Conflict:
            pass  # a request holds the container: the node's next report tries again

    def _settle_soon(self, name: str) -> None:
        now = time.monotonic()
        if name in self._settling or now - self._settle_tried.get(name, -SETTLE_INTERVAL) < SETTLE_INTERVAL:
            return
        self._settle_tried[name] = now
        if len(self._settle_tried) > 10_000:  # names settled long ago
            self._settle_tried = {n: t for n, t in self._settle_tried.items() if now - t < SETTLE_INTERVAL}
        self._settling.add(name)
        task = asyncio.create_task(self.settle_doubt(name))
        self._tasks.add(task)
        task.add_done_callback(lambda t: (self._tasks.discard(t), self._settling.discard(name)))
