"""An asyncio event loop on simulated time: the real HA code runs unchanged, minutes in milliseconds.

`loop.time()` is the simulated clock (it starts at 0). When every task waits
for a timer, the clock jumps to the next timer instead of sleeping, so
`asyncio.sleep`, `asyncio.timeout` and the code's own clocks (given
`loop.time`) all agree. Real work still happens in threads (`asyncio.to_thread`:
the agent's lease file; SQLite: the store): while any is in flight the clock
stands still and the loop waits for it in real time, so a run is the same
every time whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any, Awaitable, Callable, TypeVar

T = TypeVar("T")

REAL_WAIT = 0.05  # seconds of real time the loop waits at once for a thread's result


class _SimulatedSelector:
    """The loop's selector, except that an idle wait moves the simulated clock on instead."""

    def __init__(self, real: selectors.BaseSelector, loop: "SimulatedLoop") -> None:
        self._real = real
        self._loop = loop

    def select(self, timeout: float | None = None) -> list:
        ready = self._real.select(0)
        if ready or timeout == 0:
            return ready
        if self._loop.real_work:  # a thread is at work: its result first, on the same simulated instant
            return self._real.select(REAL_WAIT if timeout is None else min(timeout, REAL_WAIT))
        if timeout is None:
            raise RuntimeError("the simulation is stuck: nothing is scheduled and nothing is at work")
        self._loop.now += timeout
        return []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class SimulatedLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.real_work = 0  # calls in flight in other threads
        self._selector = _SimulatedSelector(self._selector, self)  # type: ignore[has-type]

    def time(self) -> float:
        return self.now

    def run_in_executor(self, executor, func, *args):  # type: ignore[override]
        self.real_work += 1
        future = super().run_in_executor(executor, func, *args)
        future.add_done_callback(self._real_work_done)
        return future

    def _real_work_done(self, _: object) -> None:
        self.real_work -= 1

    async def real(self, call: Awaitable[T]) -> T:
        """Await work done outside the loop's timers (aiosqlite's thread) with the clock held."""
        self.real_work += 1
        try:
            return await call
        finally:
            self.real_work -= 1


def run_simulated(main: Callable[[SimulatedLoop], Awaitable[T]]) -> T:
    """Run `main(loop)` to completion on a fresh simulated loop."""
    loop = SimulatedLoop()
    try:
        return loop.run_until_complete(main(loop))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.real(loop.shutdown_default_executor()))  # a thread joins the pool's
        loop.close()


class RealWorkStore:
    """A store (the real SqliteStore) whose every call holds the simulated clock while it runs."""

    def __init__(self, store: Any, loop: SimulatedLoop) -> None:
        self._store = store
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not asyncio.iscoroutinefunction(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await self._loop.real(attr(*args, **kwargs))

        return call
