"""Fake hosts for the controller: what each agent holds, answered in memory.

A FakeWorld is the fleet's hardware: FakeHosts (their containers, what they received in
staging per operation, their own checkpoints per operation, their post-copy sides) and one
FakeSan (the shared storage: each image volume's owner, generation and whether it is
attached). FakeAgent answers the controller's AgentClient calls with the same signatures
and return types, following the real agent's rules closely enough that a wrong plan shows:

- a container's disk is a `data` token. Copying a running container's rootfs gives an
  inconsistent snapshot (`...~partial`): only a copy made once it stopped or froze is whole.
- its memory is a `mem` token: a fresh boot makes a new one, a checkpoint carries it.
- adopt installs what staging received (NotFound if nothing) or attaches the shared volume
  (refused for an older generation or a volume attached elsewhere, as ownership.py does);
- start of a container whose shared volume is not attached here fails;
- a stop-and-copy checkpoint leaves the source stopped with a checkpoint it can restore;
- restore of a received checkpoint runs it on the target; release removes the host's copy.

The world watches rule 1 at every moment: whenever a copy starts running, no other host may
run the same container (`violations`).
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, replace
from typing import Callable

from corral.api.convert import container_to_pb
from corral.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied,
                           RuntimeFailure, Unavailable)
from corral.model import Container, ContainerState, Limits, NetworkAttachment, NodeFacts, NodeState
from corral.v1 import agent_pb2 as apb

RUNNING, STOPPED, FROZEN = "running", "stopped", "frozen"
SHARED = frozenset({"image", "lvm"})
PARTIAL = "~partial"  # a rootfs copied while the container ran: not a consistent disk


def data_of(name: str) -> str:
    """The disk contents every copy of `name` must end with."""
    return f"disk-of-{name}"


PREFLIGHT_MEMORY_BYTES = 300 << 20  # what every container's pre-flight sees in its tasks


@dataclass
class Copy:
    """One host's copy of a container."""

    name: str
    template: str
    storage: str
    limits: Limits
    network: NetworkAttachment
    created_at: float
    state: str = STOPPED
    data: str | None = None  # local storage: the rootfs; shared: on the SAN
    mem: str | None = None  # the memory of its processes, while it runs or is frozen
    adopted_by: str = ""  # the operation that installed it here


@dataclass
class Checkpoint:
    mem: str | None  # None: a post-copy dump (its memory is served, not in it)
    lazy: bool = False
    kept: bool = False  # a complete checkpoint a failed post-copy source kept


@dataclass
class Staging:
    """What a destination received for one operation (staging/<op>/)."""

    open: bool = True
    rootfs: str | None = None
    checkpoint: Checkpoint | None = None
    predumps: int = 0


@dataclass
class Volume:
    node: str
    generation: int
    attached: bool
    data: str


class FakeSan:
    """The shared storage: image volumes and their ownership markers (agent/storage/ownership.py)."""

    def __init__(self) -> None:
        self.volumes: dict[str, Volume] = {}

    def create(self, name: str, node: str) -> None:
        if name in self.volumes:
            raise AlreadyExists(f"volume {name} already exists")
        self.volumes[name] = Volume(node, 0, True, data_of(name))

    def attached_on(self, name: str, node: str) -> bool:
        v = self.volumes.get(name)
        return v is not None and v.node == node and v.attached

    def attach(self, name: str, node: str, generation: int, takeover_from: str = "") -> None:
        v = self.volumes.get(name)
        if v is None:
            raise NotFound(f"volume {name} does not exist")
        if generation < v.generation:
            raise PermissionDenied(f"stale order for volume {name}: generation {generation} is older than "
                                   f"generation {v.generation}, held by {v.node}")  # fmt: skip
        if v.node != node:
            if v.attached and takeover_from == v.node and generation > v.generation:
                pass  # failover: the controller proved the holder cannot use it any more
            elif v.attached:
                raise PermissionDenied(f"volume {name} is attached on {v.node} (generation {v.generation}); "
                                       "it must be detached there first")  # fmt: skip
            if generation == v.generation:
                raise PermissionDenied(f"generation {generation} of volume {name} was given to {v.node}, not {node}")
        v.node, v.generation, v.attached = node, generation, True

    def detach(self, name: str, node: str) -> None:
        v = self.volumes.get(name)
        if v is not None and v.node == node:
            v.attached = False  # another host's volume: only our mount goes, the marker stays

    def destroy(self, name: str, node: str) -> None:
        v = self.volumes.get(name)
        if v is None:
            return
        if v.attached and v.node != node:
            raise PermissionDenied(f"volume {name} is attached on {v.node}; it cannot be destroyed from {node}")
        del self.volumes[name]


@dataclass
class PostCopySide:
    state: str  # "moving" | "done" | "failed"
    detail: str = ""


class FakeHost:
    def __init__(self, world: "FakeWorld", name: str) -> None:
        self.world = world
        self.name = name
        self.address = f"10.9.0.{len(world.hosts) + 1}:7701"
        self.transfer_address = f"10.9.0.{len(world.hosts) + 1}:2222"
        self.containers: dict[str, Copy] = {}
        self.staging: dict[str, Staging] = {}
        self.checkpoints: dict[str, Checkpoint] = {}
        self.predumps: dict[str, int] = {}
        self.expected_images: dict[str, int] = {}  # by op: what PrepareReceive said its images would hold
        self.sources: dict[str, PostCopySide] = {}
        self.targets: dict[str, PostCopySide] = {}
        self.reachable = True
        self.lost_replies: set[str] = set()  # calls whose work is done but whose reply is lost (once each)
        self.cut_after: set[str] = set()  # calls after whose work the host drops off the network (once each)
        self.refuse: set[str] = set()  # calls that fail before doing anything (once each)
        self.calls: list[tuple[str, tuple]] = []

    # -- what the checks read ------------------------------------------------------

    def disk(self, name: str) -> str | None:
        copy = self.containers.get(name)
        if copy is None:
            return None
        if copy.storage in SHARED:
            v = self.world.san.volumes.get(name)
            return v.data if v is not None and v.node == self.name and v.attached else None
        return copy.data

    def copy(self, name: str) -> Copy:
        copy = self.containers.get(name)
        if copy is None:
            raise NotFound(f"container {name!r} does not exist on node {self.name!r}")
        return copy

    def view(self, copy: Copy) -> Container:
        # The real agent reports a frozen post-copy source as running (its processes exist).
        state = ContainerState.RUNNING if copy.state in (RUNNING, FROZEN) else ContainerState.STOPPED
        return Container(name=copy.name, node=self.name, template=copy.template, state=state, limits=copy.limits,
                         network=copy.network, storage=copy.storage, created_at=copy.created_at,
                         init_pid=1000 if state == ContainerState.RUNNING else 0)  # fmt: skip

    def run(self, copy: Copy, mem: str | None) -> None:
        if copy.storage in SHARED and not self.world.san.attached_on(copy.name, self.name):
            raise FailedPrecondition(f"{copy.name}: its {copy.storage} volume is not attached on {self.name}")
        copy.state, copy.mem = RUNNING, mem or self.world.new_boot(copy.name)
        self.world.check_one_running(copy.name)

    def stop(self, copy: Copy) -> None:
        copy.state, copy.mem = STOPPED, None

    def snapshot(self, copy: Copy) -> str | None:
        """The rootfs as a copy of it now would have it."""
        data = self.disk(copy.name)
        if data is None:
            raise NotFound(f"no root filesystem of {copy.name!r} on {self.name}")
        return data + PARTIAL if copy.state == RUNNING else data


class FakeWorld:
    def __init__(self, names: tuple[str, ...] = ("n1", "n2", "n3"),
                 live_strategies: tuple[str, ...] = ("stop-and-copy", "pre-copy", "post-copy")) -> None:  # fmt: skip
        self.hosts: dict[str, FakeHost] = {}
        for n in names:
            self.hosts[n] = FakeHost(self, n)
        self.san = FakeSan()
        self.live_strategies = live_strategies
        self.violations: list[str] = []
        self.fail_pages = False  # post-copy: the page transfer breaks once the target has resumed
        self._boots = itertools.count(1)

    def facts(self, name: str) -> NodeFacts:
        h = self.hosts[name]
        return NodeFacts(name=name, address=h.address, cpus=8, memory_bytes=64 << 30, memory_available_bytes=60 << 30,
                         disk_bytes=1 << 40, disk_free_bytes=1 << 40, criu_ok=True, storage_drivers=("dir", "image"),
                         live_strategies=self.live_strategies)  # fmt: skip

    def new_boot(self, name: str) -> str:
        return f"{name}-boot{next(self._boots)}"

    def by_transfer_address(self, address: str) -> FakeHost:
        for h in self.hosts.values():
            if h.transfer_address == address:
                return h
        raise Unavailable(f"nothing listens on {address}")

    def running(self, name: str) -> list[str]:
        return [h.name for h in self.hosts.values() if name in h.containers and h.containers[name].state == RUNNING]

    def holders(self, name: str) -> list[str]:
        return [h.name for h in self.hosts.values() if name in h.containers]

    def check_one_running(self, name: str) -> None:
        running = self.running(name)
        if len(running) > 1:
            self.violations.append(f"{name} runs on {', '.join(running)} at once")


class FakeAgentPool:
    """AgentPool over the fake hosts, for one life of the controller: once that controller
    has crashed (`alive = False`), a call through it raises what killed it (a dead process
    makes no calls)."""

    def __init__(self, world: FakeWorld, on_dead_call: Callable[[], BaseException]) -> None:
        self.world = world
        self.alive = True
        self._on_dead_call = on_dead_call

    def client(self, facts: NodeFacts) -> "FakeAgent":
        return FakeAgent(self, self.world.hosts[facts.name])

    def ready(self, nodes, name: str) -> "FakeAgent":
        node = nodes.get(name)
        if node is None:
            raise NotFound(f"node {name!r} is not registered")
        if node.state != NodeState.READY:
            raise Unavailable(f"node {name!r} is {node.state.value}")
        return self.client(node.facts)

    async def close(self) -> None:
        pass


def _call(fn):
    """Every agent call: the controller must be alive and the host reachable; a host may do the
    work and lose the reply."""

    async def wrapper(self: "FakeAgent", *args, **kwargs):
        if not self.pool.alive:
            raise self.pool._on_dead_call()
        await asyncio.sleep(0)
        host = self.host
        if not host.reachable:
            raise Unavailable(f"agent on node {host.name!r} is unreachable")
        host.calls.append((fn.__name__, args))
        if fn.__name__ in host.refuse:
            host.refuse.discard(fn.__name__)
            raise RuntimeFailure(f"{fn.__name__} of {args[:2]} failed on {host.name}")
        result = await fn(self, *args, **kwargs)
        if fn.__name__ in host.lost_replies:
            host.lost_replies.discard(fn.__name__)
            raise Unavailable(f"agent on node {host.name!r}: connection reset before the reply")
        if fn.__name__ in host.cut_after:
            host.cut_after.discard(fn.__name__)
            host.reachable = False
            raise Unavailable(f"agent on node {host.name!r} is unreachable")
        return result

    wrapper.__name__ = fn.__name__
    return wrapper


class FakeAgent:
    """AgentClient's methods, answered by one fake host."""

    def __init__(self, pool: FakeAgentPool, host: FakeHost) -> None:
        self.pool = pool
        self.host = host
        self.node = host.name
        self.peer = f"agent on node {host.name!r}"

    @property
    def san(self) -> FakeSan:
        return self.host.world.san

    # -- lifecycle ---------------------------------------------------------------------

    @_call
    async def create(self, name: str, template: str, limits: Limits, network: NetworkAttachment,
                     storage: str) -> Container:  # fmt: skip
        h = self.host
        if name in h.containers:
            raise AlreadyExists(f"container {name!r} already exists on node {h.name!r}")
        copy = Copy(name, template, storage or "dir", limits, network, created_at=1.0)
        if copy.storage in SHARED:
            self.san.create(name, h.name)
        else:
            copy.data = data_of(name)
        h.containers[name] = copy
        return h.view(copy)

    @_call
    async def start(self, name: str, *, stateless: bool = False) -> Container:
        h = self.host
        copy = h.copy(name)
        if copy.state == STOPPED:
            h.run(copy, None)
        return h.view(copy)

    @_call
    async def stop(self, name: str, force: bool, timeout: int, *, stateful: bool = False) -> Container:
        h = self.host
        copy = h.copy(name)
        h.stop(copy)
        return h.view(copy)

    @_call
    async def destroy(self, name: str, force: bool) -> None:
        h = self.host
        copy = h.copy(name)
        if copy.state != STOPPED and not force:
            raise FailedPrecondition(f"container {name!r} is running; stop it first or use --force")
        if copy.storage in SHARED:
            self.san.destroy(name, h.name)
        del h.containers[name]

    @_call
    async def get(self, name: str, *, wait_idle: bool = False) -> Container:
        return self.host.view(self.host.copy(name))

    @_call
    async def list_snapshots(self, name: str) -> list:
        self.host.copy(name)
        return []  # fake hosts keep no snapshots (nor saved processes)

    @_call
    async def set_limits(self, name: str, limits: Limits) -> Container:
        copy = self.host.copy(name)
        copy.limits = copy.limits.merged(limits)
        return self.host.view(copy)

    # -- migration: destination ----------------------------------------------------------

    @_call
    async def await_landing(self, op_id: str, timeout: float) -> apb.AwaitLandingReply:
        expected = self.host.expected_images.get(op_id, 0)
        return apb.AwaitLandingReply(ready=expected > 0, bytes=expected)

    @_call
    async def prepare_receive(self, op_id: str, name: str, public_key: str, ttl: int,
                              expect_image_bytes: int = 0) -> apb.ReceiveGrant:  # fmt: skip
        h = self.host
        if name in h.containers:
            raise AlreadyExists(f"container {name!r} already exists on node {h.name!r}")
        if not public_key.startswith("ssh-"):
            raise InvalidArgument("the operation's public key must be in OpenSSH format")
        h.staging.setdefault(op_id, Staging()).open = True
        h.expected_images[op_id] = expect_image_bytes
        return apb.ReceiveGrant(address=h.transfer_address, user=f"op-{op_id}", host_key="ssh-ed25519 FAKE")

    @_call
    async def finish_receive(self, op_id: str, discard: bool) -> None:
        h = self.host
        target = h.targets.get(op_id)
        if target is not None and target.state == "moving" and not discard:
            raise FailedPrecondition(f"operation {op_id}: pages are still arriving from the source")
        h.targets.pop(op_id, None)
        h.staging.pop(op_id, None)

    @_call
    async def adopt(self, op_id: str, container: Container, volume_generation: int = 0,
                    takeover_from: str = "") -> Container:  # fmt: skip
        h = self.host
        name = container.name
        existing = h.containers.get(name)
        if existing is not None:
            if existing.adopted_by == op_id:
                return h.view(existing)  # a repeated step
            raise AlreadyExists(f"container {name!r} already exists on node {h.name!r}")
        copy = Copy(name, container.template, container.storage, container.limits, container.network,
                    container.created_at, adopted_by=op_id)  # fmt: skip
        if container.storage in SHARED:
            # The real agent reads the generation from the container it is given.
            self.san.attach(name, h.name, container.volume_generation, takeover_from)
        else:
            staged = h.staging.get(op_id)
            if staged is None or staged.rootfs is None:
                raise NotFound(f"no received root filesystem for {name!r} on {h.name}")
            copy.data, staged.rootfs = staged.rootfs, None  # moved into place
        h.containers[name] = copy
        return h.view(copy)

    @_call
    async def restore(self, op_id: str, name: str, source: int, lazy_from: tuple[str, int] | None = None,
                      lazy_tls: apb.PageServerTls | None = None) -> apb.RestoreResult:  # fmt: skip
        h = self.host
        local = source == apb.RESTORE_SOURCE_LOCAL
        if local:
            images = h.checkpoints.get(op_id)
        else:
            staged = h.staging.get(op_id)
            images = staged.checkpoint if staged is not None else None
        if images is None:
            raise NotFound(f"no checkpoint images for {name!r} of operation {op_id} on {h.name}")
        copy = h.copy(name)
        if lazy_from is not None:
            if local or not images.lazy:
                raise InvalidArgument("a post-copy restore takes the lazy images received from the source")
            if op_id in h.targets:
                return self._restored(copy)  # a repeated step
            source = next(s for s in h.world.hosts.values() if op_id in s.sources)
            src_copy = source.containers[name]
            h.run(copy, src_copy.mem)  # its memory arrives from the source's page server
            if h.world.fail_pages:
                # The transfer breaks: the target's copy dies (its memory is incomplete); the source
                # dumps itself whole and keeps that checkpoint, stopped (agent/postcopy.py).
                h.stop(copy)
                h.targets[op_id] = PostCopySide("failed", "lazy pages transfer failed")
                source.checkpoints[op_id] = Checkpoint(src_copy.mem, kept=True)
                source.stop(src_copy)
                source.sources[op_id] = PostCopySide("failed", "kept after a failed page transfer")
                return self._restored(copy, ContainerState.RUNNING)
            h.targets[op_id] = PostCopySide("done")
            source.sources[op_id] = PostCopySide("done")
            return self._restored(copy)
        if images.lazy:
            raise FailedPrecondition("the checkpoint is a post-copy dump without memory")
        if copy.state != STOPPED:
            raise FailedPrecondition(f"container {name!r} is already {copy.state} on {h.name}")
        h.run(copy, images.mem)
        return self._restored(copy)

    def _restored(self, copy: Copy, state: ContainerState | None = None) -> apb.RestoreResult:
        ct = self.host.view(copy)
        if state is not None:
            ct = replace(ct, state=state)
        return apb.RestoreResult(container=container_to_pb(ct), wall_ms=5.0, restore_ms=3.0, finished_at=1.0)

    # -- migration: source -----------------------------------------------------------------

    def _staging_at(self, address: str, op_id: str) -> Staging:
        target = self.host.world.by_transfer_address(address)
        staged = target.staging.get(op_id)
        if staged is None or not staged.open:
            raise Unavailable(f"{target.name} refused the transfer: no channel open for operation {op_id}")
        return staged

    @_call
    async def send_files(self, op_id: str, name: str, content: int, grant: apb.ReceiveGrant, private_key: str,
                         timeout: int, on_progress: Callable[[apb.TransferUpdate], None]) -> apb.TransferUpdate:  # fmt: skip
        h = self.host
        staged = self._staging_at(grant.address, op_id)
        if content == apb.TRANSFER_CONTENT_ROOTFS:
            staged.rootfs = h.snapshot(h.copy(name))
        elif content == apb.TRANSFER_CONTENT_PREDUMP:
            if not h.predumps.get(op_id):
                raise NotFound(f"nothing to send: no pre-dumps of operation {op_id}")
            staged.predumps = h.predumps[op_id]
        elif content == apb.TRANSFER_CONTENT_CHECKPOINT:
            if op_id not in h.checkpoints:
                raise NotFound(f"nothing to send: no checkpoint of operation {op_id}")
            staged.checkpoint = h.checkpoints[op_id]
        else:
            raise InvalidArgument(f"unknown transfer content {content!r}")
        on_progress(apb.TransferUpdate(bytes_done=2048, bytes_total=4096))
        return apb.TransferUpdate(finished=True, bytes_done=4096, bytes_total=4096, bytes_sent=4096,
                                  literal_bytes=4096, total_size=4096)  # fmt: skip

    def _send_along(self, op_id: str, name: str, send: apb.SendAlong | None) -> None:
        if send is None:
            return
        h = self.host
        staged = self._staging_at(send.address, op_id)
        if send.rootfs:
            staged.rootfs = h.snapshot(h.copy(name))
        staged.checkpoint = h.checkpoints[op_id]

    @_call
    async def checkpoint(self, op_id: str, name: str, mode: int, iteration: int = 0,
                         send: apb.SendAlong | None = None) -> apb.CheckpointResult:  # fmt: skip
        h = self.host
        copy = h.copy(name)
        if mode == apb.CHECKPOINT_MODE_LAZY and op_id in h.sources:
            self._send_along(op_id, name, send)  # a repeated step: send again
            return self._lazy_result(op_id)
        if copy.state != RUNNING:
            raise FailedPrecondition(f"container {name!r} is not running")
        if mode == apb.CHECKPOINT_MODE_TRIAL:
            return apb.CheckpointResult(wall_ms=20.0, frozen_ms=10.0, pause_ms=10.0, memory_bytes=PREFLIGHT_MEMORY_BYTES)
        if mode == apb.CHECKPOINT_MODE_PREDUMP:
            if iteration < 1:
                raise InvalidArgument("pre-dump iterations are numbered from 1")
            h.predumps[op_id] = iteration
            return apb.CheckpointResult(wall_ms=20.0, pause_ms=5.0, pages_written=600 >> iteration)
        if mode == apb.CHECKPOINT_MODE_STOP:
            if iteration and h.predumps.get(op_id, 0) < iteration:
                raise NotFound(f"no pre-dump {iteration} of operation {op_id}")
            h.checkpoints[op_id] = Checkpoint(copy.mem)
            h.stop(copy)  # dumped and stopped: its disk is consistent from here
            self._send_along(op_id, name, send)
            return apb.CheckpointResult(wall_ms=30.0, frozen_ms=20.0, pause_ms=20.0, sent_ms=5.0,
                                        bytes_sent=8192 if send else 0)  # fmt: skip
        if mode == apb.CHECKPOINT_MODE_LAZY:
            h.checkpoints[op_id] = Checkpoint(None, lazy=True)
            copy.state = FROZEN  # frozen, serving its pages (memory stays in copy.mem)
            h.sources[op_id] = PostCopySide("moving")
            self._send_along(op_id, name, send)
            return self._lazy_result(op_id)
        raise InvalidArgument("checkpoint mode must be TRIAL, STOP, LAZY or PREDUMP")

    def _lazy_result(self, op_id: str) -> apb.CheckpointResult:
        tls = apb.PageServerTls(ca="-----BEGIN CA", cert="-----BEGIN CERT", key="-----BEGIN KEY")
        return apb.CheckpointResult(wall_ms=30.0, pause_ms=20.0, page_server_address=self.host.address.split(":")[0],
                                    page_server_port=27000, lazy_bytes=1 << 20, page_server_tls=tls)  # fmt: skip

    @_call
    async def watch_sending(self, op_id: str, on_update: Callable[[apb.TransferUpdate], None], timeout: float) -> None:
        return None

    @_call
    async def wait_pages(self, op_id: str, name: str, timeout: float,
                         on_update: Callable[[apb.PagesUpdate], None] | None = None) -> apb.PagesUpdate:  # fmt: skip
        h = self.host
        side = h.targets.get(op_id) or h.sources.get(op_id)
        if side is None:
            if op_id in h.checkpoints and h.checkpoints[op_id].kept:
                return apb.PagesUpdate(state=apb.PAGES_STATE_FAILED, detail="kept after a failed page transfer",
                                       kept_checkpoint=f"/var/lib/corral/checkpoints/{op_id}")  # fmt: skip
            return apb.PagesUpdate(state=apb.PAGES_STATE_UNKNOWN, detail=f"no post-copy of {op_id} on {h.name}")
        return self._pages(op_id, side)

    def _pages(self, op_id: str, side: PostCopySide) -> apb.PagesUpdate:
        state = {"moving": apb.PAGES_STATE_MOVING, "done": apb.PAGES_STATE_DONE, "failed": apb.PAGES_STATE_FAILED}
        kept = self.host.checkpoints.get(op_id)
        where = f"/var/lib/corral/checkpoints/{op_id}" if kept is not None and kept.kept else ""
        return apb.PagesUpdate(state=state[side.state], detail=side.detail, kept_checkpoint=where,
                               pages_done_at=1.0 if side.state == "done" else 0.0)  # fmt: skip

    @_call
    async def keep_source(self, op_id: str, name: str) -> apb.PagesUpdate:
        h = self.host
        side = h.sources.get(op_id)
        if side is not None and side.state != "failed":
            copy = h.copy(name)
            h.checkpoints[op_id] = Checkpoint(copy.mem, kept=True)
            h.stop(copy)
            side.state, side.detail = "failed", "kept: its destination copy is gone"
        if op_id in h.checkpoints and h.checkpoints[op_id].kept:
            return self._pages(op_id, h.sources.get(op_id) or PostCopySide("failed", "kept"))
        return apb.PagesUpdate(state=apb.PAGES_STATE_UNKNOWN, detail=f"no post-copy of {op_id} on {h.name}")

    @_call
    async def resume_source(self, op_id: str, name: str) -> Container:
        h = self.host
        copy = h.copy(name)
        side = h.sources.get(op_id)
        if side is not None and side.state != "failed" and copy.state == FROZEN:
            copy.state = STOPPED
            h.run(copy, copy.mem)  # thawed, whole
            h.sources.pop(op_id, None)
            return h.view(copy)
        if copy.state == RUNNING:
            return h.view(copy)
        kept = h.checkpoints.get(op_id)
        if kept is None or not kept.kept:
            raise FailedPrecondition(f"{name!r} cannot resume here: no complete checkpoint of {op_id}")
        h.run(copy, kept.mem)
        h.sources.pop(op_id, None)
        del h.checkpoints[op_id]  # it runs again: the checkpoint is stale now
        return h.view(copy)

    @_call
    async def release(self, op_id: str, name: str) -> None:
        h = self.host
        h.targets.pop(op_id, None)
        h.sources.pop(op_id, None)
        copy = h.containers.pop(name, None)
        if copy is not None and copy.storage in SHARED:
            self.san.detach(name, h.name)
        h.checkpoints.pop(op_id, None)
        h.predumps.pop(op_id, None)

    @_call
    async def detach_volume(self, op_id: str, name: str) -> None:
        h = self.host
        copy = h.copy(name)
        if copy.storage not in SHARED:
            raise FailedPrecondition(f"{copy.storage} storage is local; it is moved by copying")
        if copy.state != STOPPED:
            raise FailedPrecondition(f"container {name!r} is running; stop it before detaching its volume")
        self.san.detach(name, h.name)

    @_call
    async def attach_volume(self, op_id: str, name: str, generation: int) -> None:
        h = self.host
        copy = h.copy(name)
        if copy.storage not in SHARED:
            raise FailedPrecondition(f"{copy.storage} storage is local; it is moved by copying")
        self.san.attach(name, h.name, generation)

    async def close(self) -> None:
        pass
