"""The operations engine: runs plans as durable, watchable, cancellable operations.

Each step is written to the store *before* it is taken and again when it is
done, so a restarted controller knows exactly how far every operation got and
hands it to its plan's `recover`, which finishes it or rolls it back.
An operation holds its container (controller.locks) from submission to its end: a
second request for the same container gets a Conflict naming it, never a queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import replace
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol, TypeVar

import structlog

from controller.model import Operation, OpState, Progress, Step, StepState
from controller.events import EventBus
from controller.locks import ContainerLocks
from controller.store.base import Store, StoreWriter
from corral.errors import Cancelled, CorralError, FailedPrecondition, NotFound

log = structlog.get_logger("corral.controller.operations")

# Progress is sent to watchers at once but written to the store at most this often.
PROGRESS_PERSIST_INTERVAL = 1.0
T = TypeVar("T")


class Plan(Protocol):
    async def run(self, ctx: "OpContext") -> dict[str, Any]:
        """Carry the operation out; returns its result. Raise to fail (then `rollback`)."""
        ...

    async def rollback(self, ctx: "OpContext", error: CorralError) -> None:
        """Put things back as they were before the operation."""
        ...

    async def recover(self, ctx: "OpContext") -> dict[str, Any]:
        """After a controller restart: finish or roll back, from the steps recorded."""
        ...


PlanFactory = Callable[[Operation], Plan]


class OpContext:
    """What a running plan uses to record itself. It is the only writer of its operation."""

    def __init__(self, engine: "Engine", op: Operation) -> None:
        self._engine = engine
        self.op = op
        self.log = log.bind(op=op.id, container=op.container)
        self._last_persist = 0.0

    async def _save(self, op: Operation) -> None:
        self.op = op
        await self._engine._persist(op)

    async def _change(self, **changes: Any) -> None:
        await self._save(self.op.changed(**changes))

    def _with_step(self, step: Step) -> Operation:
        return self.op.with_step(step).changed()

    @contextlib.asynccontextmanager
    async def step(
        self, name: str, detail: str = "", then: Callable[[StoreWriter], Awaitable[Any]] | None = None
    ) -> AsyncIterator[None]:
        """Record a step as started (durably) before running it, and its outcome after. `then`
        writes what the step did into the store in the same transaction as its DONE record,
        so a crash cannot leave one without the other."""
        started = time.time()
        await self._save(self._with_step(Step(name, StepState.STARTED, started, detail=detail)))
        self.log.info("step started", step=name)
        try:
            yield
            done = self._with_step(Step(name, StepState.DONE, started, time.time(), detail=detail))
            if then is None:
                await self._save(done)
            else:
                async with self._engine.store.transaction() as tx:
                    await then(tx)
                    await tx.put_operation(done)
                self.op = done
                self._engine._notify(done)
        except BaseException as exc:
            failed = Step(name, StepState.FAILED, started, time.time(), detail=_describe(exc))
            await self._save(self._with_step(failed))
            raise
        self.log.info("step done", step=name, ms=round(done.steps[-1].duration_ms, 1))

    async def commit_step(self, name: str, write: Callable[[StoreWriter], Awaitable[T]], detail: str = "") -> T:
        """A step that is only a change to the store (its DONE record commits with it)."""
        results: list[T] = []

        async def then(tx: StoreWriter) -> None:
            results.append(await write(tx))

        async with self.step(name, detail, then=then):
            pass
        return results[0]

    def progress(self, **changes: Any) -> None:
        """Update progress (phase, bytes_done, bytes_total, rate_bps, eta_s, message) for watchers."""
        self.op = self.op.changed(progress=replace(self.op.progress, **changes))
        self._engine._notify(self.op)
        now = time.monotonic()
        if now - self._last_persist >= PROGRESS_PERSIST_INTERVAL:
            self._last_persist = now
            # Unordered is fine: the store never lets this older revision overwrite a newer one.
            self._engine._spawn_persist(self.op)

    async def phase(self, phase: str, message: str = "") -> None:
        """Shown to watchers at once; stored with the next step (a phase alone decides nothing)."""
        self._change_unstored(progress=Progress(phase=phase, message=message))

    def _change_unstored(self, **changes: Any) -> None:
        self.op = self.op.changed(**changes)
        self._engine._notify(self.op)

    async def timing(self, **timings_ms: float) -> None:
        await self._change(timings={**self.op.timings, **{k: round(v, 1) for k, v in timings_ms.items()}})

    async def set_params(self, params: Any) -> None:
        """Store what the plan learnt, as its typed params (a dataclass with to_dict())."""
        await self._change(params=params.to_dict())

    def event(self, kind: str, message: str, **fields: Any) -> None:
        self._engine.events.emit(kind, message, container=self.op.container, op=self.op.id, **fields)

    def check_cancel(self) -> None:
        """Called by plans at points where stopping is safe."""
        if self.op.cancel_requested:
            raise Cancelled(f"operation {self.op.id} was cancelled")


class Engine:
    def __init__(self, store: Store, plans: dict[str, PlanFactory], locks: ContainerLocks | None = None,
                 events: EventBus | None = None) -> None:  # fmt: skip
        self.store = store
        self.plans = plans
        self.locks = locks or ContainerLocks()
        self.events = events or EventBus()
        self._active: dict[str, Operation] = {}
        self._contexts: dict[str, OpContext] = {}
        self._changed: dict[str, asyncio.Condition] = {}
        self._tasks: set[asyncio.Task] = set()
        # Why recent operations failed, as raised (kept for a caller waiting on them, bounded).
        self._errors: dict[str, CorralError] = {}

    # -- public ------------------------------------------------------------------

    async def start(self) -> None:
        """Pick up what a previous controller left unfinished."""
        for op in await self.store.list_operations(active_only=True):
            holder = _holder(op)
            if self.locks.holder(op.container) is not None:
                # Queued behind another by an older controller: nothing was done.
                await self.store.put_operation(op.changed(state=OpState.FAILED, error="the controller restarted "
                                                          "before this operation began; nothing was done"))  # fmt: skip
                continue
            if op.state == OpState.PENDING:
                # Never begun, but what was submitted with it (a create's record, its address) is
                # there: its plan's rollback takes it back (recovery harness: create, write 2).
                op = replace(op, state=OpState.ROLLING_BACK,
                             error="the controller restarted before this operation began; nothing was done")
            self.locks.take(op.container, holder)
            self._active[op.id] = op
            self._launch(op, recovering=True)
            log.info("resuming operation", op=op.id, container=op.container, state=op.state.value)

    async def submit(
        self, kind: str, container: str, params: dict[str, Any],
        with_change: Callable[[StoreWriter], Awaitable[Any]] | None = None,
    ) -> Operation:  # fmt: skip
        """Start an operation on `container`, which it holds until it ends (Conflict if busy).
        `with_change` is written in the same transaction as the operation's first record."""
        if kind not in self.plans:
            raise NotFound(f"unknown operation kind {kind!r}")
        op = Operation.new(kind, container, params)
        self.locks.take(container, _holder(op))
        try:
            async with self.store.transaction() as tx:
                if with_change is not None:
                    await with_change(tx)
                await tx.put_operation(op)
        except BaseException:
            self.locks.release(container, _holder(op))
            raise
        self._active[op.id] = op
        self._launch(op, recovering=False)
        log.info("operation submitted", op=op.id, kind=kind, container=container, params=params)
        self.events.emit("operation", f"{kind} of {container} started", container=container, op=op.id,
                         op_kind=kind, state="running")  # fmt: skip
        return op

    def active(self, kind: str) -> list[Operation]:
        """The operations of this kind in progress."""
        return [op for op in self._active.values() if op.kind == kind]

    def active_for(self, container: str) -> Operation | None:
        return next((op for op in self._active.values() if op.container == container), None)

    async def get(self, op_id: str) -> Operation:
        op = self._active.get(op_id) or await self.store.get_operation(op_id)
        if op is None:
            raise NotFound(f"operation {op_id!r} does not exist")
        return op

    async def list(self, container: str | None = None, active_only: bool = False) -> list[Operation]:
        stored = {op.id: op for op in await self.store.list_operations(container, active_only)}
        for op in self._active.values():
            if op.id in stored:
                stored[op.id] = op  # fresher progress than the store has
        return sorted(stored.values(), key=lambda o: o.created_at)

    async def watch(self, op_id: str) -> AsyncIterator[Operation]:
        """Snapshots of the operation as it changes, ending with its final state."""
        op = await self.get(op_id)
        yield op
        while not op.state.finished:
            cond = self._changed.setdefault(op_id, asyncio.Condition())
            async with cond:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5):
                        await cond.wait()
            op = await self.get(op_id)
            yield op
        self._changed.pop(op_id, None)

    async def wait(self, op_id: str) -> Operation:
        last = None
        async for last in self.watch(op_id):
            pass
        assert last is not None
        return last

    async def outcome(self, op_id: str) -> Operation:
        """Wait for the operation to end; raises the error it failed with (its own class)."""
        op = await self.wait(op_id)
        error = self._errors.pop(op_id, None)
        if op.state != OpState.SUCCEEDED:
            raise error or CorralError(op.error or f"operation {op_id} {op.state.value}")
        return op

    async def cancel(self, op_id: str) -> Operation:
        op = await self.get(op_id)
        if op.state.finished:
            raise FailedPrecondition(f"operation {op_id} is already {op.state.value}")
        if op.state == OpState.ROLLING_BACK:
            raise FailedPrecondition(f"operation {op_id} is already rolling back")
        ctx = self._contexts.get(op_id)
        if ctx is None:
            raise FailedPrecondition(f"operation {op_id} is not running here")
        await ctx._change(cancel_requested=True)  # through its one writer: the flag cannot be lost
        log.info("cancel requested", op=op_id)
        return ctx.op

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    # -- running -------------------------------------------------------------------

    def _launch(self, op: Operation, recovering: bool) -> None:
        task = asyncio.create_task(self._run(op, recovering), name=f"op-{op.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, op: Operation, recovering: bool) -> None:
        ctx = OpContext(self, op)
        self._contexts[op.id] = ctx
        plan = self.plans[op.kind](op)
        try:
            if recovering:
                ctx.log.info("recovering operation after controller restart")
                if op.state == OpState.ROLLING_BACK:
                    await self._roll_back(ctx, plan, CorralError(op.error or "interrupted"))
                    return
                result = await plan.recover(ctx)
            else:
                # Stored with its first step: until then nothing was done, and a PENDING record says so.
                ctx._change_unstored(state=OpState.RUNNING)
                result = await plan.run(ctx)
            await self._finish(ctx, OpState.SUCCEEDED, result=result)
        except asyncio.CancelledError:
            raise  # controller shutting down: the operation resumes on the next start
        except CorralError as exc:
            await self._roll_back(ctx, plan, exc)
        except Exception as exc:  # a bug: still roll back, and say what happened
            ctx.log.exception("operation crashed")
            await self._roll_back(ctx, plan, CorralError(f"internal error: {exc!r}"))
        finally:
            # Whatever happened to the last write, the container is not held by a task that is over.
            self._active.pop(op.id, None)
            self._contexts.pop(op.id, None)
            self.locks.release(op.container, _holder(op))

    async def _roll_back(self, ctx: OpContext, plan: Plan, error: CorralError) -> None:
        ctx.log.warning("operation failed, rolling back", error=error.message)
        await ctx._change(state=OpState.ROLLING_BACK, error=error.message)
        try:
            await plan.rollback(ctx, error)
        except CorralError as exc:
            ctx.log.error("rollback failed", error=exc.message)
            await self._finish(ctx, OpState.FAILED, error=f"{error.message}; rollback failed: {exc.message}")
            return
        final = OpState.CANCELLED if isinstance(error, Cancelled) else OpState.FAILED
        self._errors[ctx.op.id] = error
        while len(self._errors) > 256:
            self._errors.pop(next(iter(self._errors)))
        await self._finish(ctx, final, error=error.message)

    async def _finish(self, ctx: OpContext, state: OpState, *, result: dict | None = None, error: str = "") -> None:
        # Free the container before anyone can see the end: a request made on seeing it must not find it held.
        self.locks.release(ctx.op.container, _holder(ctx.op))
        await ctx._change(state=state, result=result or ctx.op.result, error=error or ctx.op.error,
                          progress=replace(ctx.op.progress, phase=state.value, message=""))  # fmt: skip
        self._active.pop(ctx.op.id, None)
        ctx.log.info("operation finished", state=state.value, error=error or None)
        op = ctx.op
        took = f" in {(op.updated_at - op.created_at) * 1000:.0f} ms" if op.created_at else ""
        self.events.emit("operation", f"{op.kind} of {op.container} {state.value}{took}"
                         + (f": {op.error}" if op.error else ""), container=op.container, op=op.id,
                         op_kind=op.kind, state=state.value, timings_ms=dict(op.timings))  # fmt: skip

    # -- bookkeeping ----------------------------------------------------------------

    async def _persist(self, op: Operation) -> None:
        if op.id in self._active:
            self._active[op.id] = op
        await self.store.put_operation(op)
        self._notify(op)

    def _spawn_persist(self, op: Operation) -> None:
        task = asyncio.create_task(self.store.put_operation(op))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _notify(self, op: Operation) -> None:
        if op.id in self._active:
            self._active[op.id] = op
        cond = self._changed.get(op.id)
        if cond is not None:
            task = asyncio.create_task(_notify_all(cond))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


def _holder(op: Operation) -> str:
    return f"operation {op.id} ({op.kind})"


async def _notify_all(cond: asyncio.Condition) -> None:
    async with cond:
        cond.notify_all()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, CorralError):
        return exc.message
    if isinstance(exc, asyncio.CancelledError):
        return "interrupted"
    return repr(exc)

