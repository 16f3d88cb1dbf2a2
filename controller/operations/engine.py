"""The operations engine: runs plans as durable, watchable, cancellable operations.

Each step is written to the store *before* it is taken and again when it is
done, so a restarted controller knows exactly how far every operation got and
hands it to its plan's `recover`, which finishes it or rolls it back.
Operations on the same container run one at a time, in submission order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from dataclasses import replace
from typing import Any, AsyncIterator, Callable, Protocol

import structlog

from controller.model import Operation, OpState, Progress, Step, StepState
from controller.store.base import Store
from corral.errors import Cancelled, CorralError, FailedPrecondition, NotFound

log = structlog.get_logger("corral.controller.operations")

# Progress is sent to watchers at once but written to the store at most this often.
PROGRESS_PERSIST_INTERVAL = 1.0


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
    """What a running plan uses to record itself."""

    def __init__(self, engine: "Engine", op: Operation) -> None:
        self._engine = engine
        self.op = op
        self.log = log.bind(op=op.id, container=op.container)
        self._last_persist = 0.0

    async def _save(self, op: Operation) -> None:
        self.op = op
        await self._engine._persist(op)

    @contextlib.asynccontextmanager
    async def step(self, name: str, detail: str = "") -> AsyncIterator[None]:
        """Record a step as started (durably) before running it, and its outcome after."""
        started = time.time()
        await self._save(self.op.with_step(Step(name, StepState.STARTED, started, detail=detail)))
        self.log.info("step started", step=name)
        try:
            yield
        except BaseException as exc:
            failed = Step(name, StepState.FAILED, started, time.time(), detail=_describe(exc))
            await self._save(self.op.with_step(failed))
            raise
        step = Step(name, StepState.DONE, started, time.time(), detail=detail)
        await self._save(self.op.with_step(step))
        self.log.info("step done", step=name, ms=round(step.duration_ms, 1))

    async def mark(self, name: str, state: StepState, detail: str = "") -> None:
        now = time.time()
        await self._save(self.op.with_step(Step(name, state, now, now, detail)))

    def progress(self, **changes: Any) -> None:
        """Update progress (phase, bytes_done, bytes_total, rate_bps, eta_s, message) for watchers."""
        self.op = replace(self.op, progress=replace(self.op.progress, **changes), updated_at=time.time())
        self._engine._notify(self.op)
        now = time.monotonic()
        if now - self._last_persist >= PROGRESS_PERSIST_INTERVAL:
            self._last_persist = now
            self._engine._spawn_persist(self.op)

    async def phase(self, phase: str, message: str = "") -> None:
        self.op = replace(self.op, progress=Progress(phase=phase, message=message), updated_at=time.time())
        await self._save(self.op)

    async def timing(self, **timings_ms: float) -> None:
        self.op = replace(self.op, timings={**self.op.timings, **{k: round(v, 1) for k, v in timings_ms.items()}})
        await self._save(self.op)

    async def set_params(self, **params: Any) -> None:
        self.op = replace(self.op, params={**self.op.params, **params})
        await self._save(self.op)

    def check_cancel(self) -> None:
        """Called by plans at points where stopping is safe."""
        if self._engine._cancel_requested(self.op.id):
            raise Cancelled(f"operation {self.op.id} was cancelled")


class Engine:
    def __init__(self, store: Store, plans: dict[str, PlanFactory]) -> None:
        self.store = store
        self.plans = plans
        self._container_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._active: dict[str, Operation] = {}
        self._changed: dict[str, asyncio.Condition] = {}
        self._tasks: set[asyncio.Task] = set()
        self._cancels: set[str] = set()

    # -- public ------------------------------------------------------------------

    async def start(self) -> None:
        """Pick up what a previous controller left unfinished."""
        for op in await self.store.list_operations(active_only=True):
            self._active[op.id] = op
            self._launch(op, recovering=op.state != OpState.PENDING)
            log.info("resuming operation", op=op.id, container=op.container, state=op.state.value)

    async def submit(self, kind: str, container: str, params: dict[str, Any]) -> Operation:
        if kind not in self.plans:
            raise NotFound(f"unknown operation kind {kind!r}")
        op = Operation.new(kind, container, params)
        await self.store.put_operation(op)
        self._active[op.id] = op
        self._launch(op, recovering=False)
        log.info("operation submitted", op=op.id, kind=kind, container=container, params=params)
        return op

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

    async def wait(self, op_id: str) -> Operation:
        last = None
        async for last in self.watch(op_id):
            pass
        assert last is not None
        return last

    async def cancel(self, op_id: str) -> Operation:
        op = await self.get(op_id)
        if op.state.finished:
            raise FailedPrecondition(f"operation {op_id} is already {op.state.value}")
        if op.state == OpState.ROLLING_BACK:
            raise FailedPrecondition(f"operation {op_id} is already rolling back")
        self._cancels.add(op_id)
        op = replace(op, cancel_requested=True, updated_at=time.time())
        await self._persist(op)
        log.info("cancel requested", op=op_id)
        return op

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
        async with self._container_locks[op.container]:
            ctx = OpContext(self, op)
            if op.cancel_requested:
                self._cancels.add(op.id)
            plan = self.plans[op.kind](op)
            try:
                if recovering:
                    ctx.log.info("recovering operation after controller restart")
                    if op.state == OpState.ROLLING_BACK:
                        await self._roll_back(ctx, plan, CorralError(op.error or "interrupted"))
                        return
                    result = await plan.recover(ctx)
                else:
                    await ctx._save(replace(ctx.op, state=OpState.RUNNING))
                    result = await plan.run(ctx)
                await self._finish(ctx, OpState.SUCCEEDED, result=result)
            except asyncio.CancelledError:
                raise  # controller shutting down: the operation resumes on the next start
            except CorralError as exc:
                await self._roll_back(ctx, plan, exc)
            except Exception as exc:  # a bug: still roll back, and say what happened
                ctx.log.exception("operation crashed")
                await self._roll_back(ctx, plan, CorralError(f"internal error: {exc!r}"))

    async def _roll_back(self, ctx: OpContext, plan: Plan, error: CorralError) -> None:
        ctx.log.warning("operation failed, rolling back", error=error.message)
        await ctx._save(replace(ctx.op, state=OpState.ROLLING_BACK, error=error.message))
        try:
            await plan.rollback(ctx, error)
        except CorralError as exc:
            ctx.log.error("rollback failed", error=exc.message)
            await self._finish(ctx, OpState.FAILED, error=f"{error.message}; rollback failed: {exc.message}")
            return
        final = OpState.CANCELLED if isinstance(error, Cancelled) else OpState.FAILED
        await self._finish(ctx, final, error=error.message)

    async def _finish(self, ctx: OpContext, state: OpState, *, result: dict | None = None, error: str = "") -> None:
        op = replace(ctx.op, state=state, result=result or ctx.op.result, error=error or ctx.op.error,
                     progress=replace(ctx.op.progress, phase=state.value, message=""), updated_at=time.time())  # fmt: skip
        await ctx._save(op)
        self._active.pop(op.id, None)
        self._cancels.discard(op.id)
        ctx.log.info("operation finished", state=state.value, error=error or None)

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

    def _cancel_requested(self, op_id: str) -> bool:
        return op_id in self._cancels


async def _notify_all(cond: asyncio.Condition) -> None:
    async with cond:
        cond.notify_all()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, CorralError):
        return exc.message
    if isinstance(exc, asyncio.CancelledError):
        return "interrupted"
    return repr(exc)

