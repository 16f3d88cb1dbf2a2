"""The operations engine keeps its promises: steps recorded before they run, rollback on
failure, cancel at safe points, one operation per container at a time, resume after a restart."""

import asyncio

import pytest

from controller.operations.engine import Engine, OpContext
from controller.model import OpState, StepState
from corral.errors import Conflict, CorralError, RuntimeFailure


class Recorder:
    """A plan that records what it did; `gate` lets a test hold it inside a step."""

    def __init__(self, events, gate=None, fail_at=None):
        self.events, self.gate, self.fail_at = events, gate, fail_at

    async def run(self, ctx: OpContext):
        for name in ("one", "two", "three"):
            ctx.check_cancel()
            async with ctx.step(name):
                # The step is on disk before its work starts.
                stored = await ctx._engine.store.get_operation(ctx.op.id)
                assert stored.step(name).state == StepState.STARTED
                self.events.append((ctx.op.container, name))
                if self.gate is not None and name == "two":
                    await self.gate.wait()
                if name == self.fail_at:
                    raise RuntimeFailure(f"{name} broke")
        return {"ok": True}

    async def rollback(self, ctx, error: CorralError):
        self.events.append((ctx.op.container, "rollback", error.message))

    async def recover(self, ctx):
        self.events.append((ctx.op.container, "recover", [s.name for s in ctx.op.steps]))
        return {"recovered": True}


async def test_success_failure_and_rollback(store):
    events = []
    engine = Engine(store, {"ok": lambda op: Recorder(events), "bad": lambda op: Recorder(events, fail_at="two")})
    good = await engine.wait((await engine.submit("ok", "c1", {})).id)
    assert good.state == OpState.SUCCEEDED and good.result == {"ok": True}
    assert [s.name for s in good.steps] == ["one", "two", "three"]
    bad = await engine.wait((await engine.submit("bad", "c2", {})).id)
    assert bad.state == OpState.FAILED and bad.error == "two broke"
    assert ("c2", "rollback", "two broke") in events and ("c2", "three") not in events
    assert (await store.get_operation(bad.id)).step("two").state == StepState.FAILED
    await engine.close()


async def test_a_second_operation_on_a_busy_container_gets_a_conflict(store):
    events, gate = [], asyncio.Event()
    engine = Engine(store, {"op": lambda op: Recorder(events, gate=gate)})
    first = await engine.submit("op", "same", {})
    await asyncio.sleep(0.1)
    with pytest.raises(Conflict, match=f"busy with operation {first.id}"):
        await engine.submit("op", "same", {})
    other = await engine.submit("op", "another", {})  # other containers are not held up
    gate.set()
    assert (await engine.wait(first.id)).state == OpState.SUCCEEDED
    assert (await engine.wait(other.id)).state == OpState.SUCCEEDED
    assert len(await store.list_operations("same")) == 1  # the refused one left no record
    again = await engine.submit("op", "same", {})  # free once the first is over
    assert (await engine.wait(again.id)).state == OpState.SUCCEEDED
    await engine.close()


async def test_cancel_rolls_back_at_the_next_safe_point(store):
    events, gate = [], asyncio.Event()
    engine = Engine(store, {"op": lambda op: Recorder(events, gate=gate)})
    op = await engine.submit("op", "c", {})
    await asyncio.sleep(0.1)
    await engine.cancel(op.id)
    gate.set()
    final = await engine.wait(op.id)
    assert final.state == OpState.CANCELLED
    assert ("c", "three") not in events and events[-1][1] == "rollback"


async def test_a_restarted_controller_recovers_unfinished_operations(store, tmp_path):
    events, gate = [], asyncio.Event()
    engine = Engine(store, {"op": lambda op: Recorder(events, gate=gate)})
    op = await engine.submit("op", "c", {})
    await asyncio.sleep(0.1)
    await engine.close()  # the controller dies inside step "two"

    again = Engine(store, {"op": lambda op: Recorder(events)})
    await again.start()
    final = await again.wait(op.id)
    assert final.state == OpState.SUCCEEDED and final.result == {"recovered": True}
    assert events[-1] == ("c", "recover", ["one", "two"])
    await again.close()
