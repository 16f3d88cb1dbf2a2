"""A spinner for a long wait with nothing to measure (a `ct create` that builds its template):
on a terminal, how long the command has waited and for what, on stderr; nothing otherwise."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import AsyncIterator

# A hint joins the line once the wait has lasted this long.
HINT_AFTER = 5.0
_FRAME = 0.1


@contextlib.asynccontextmanager
async def waiting(obj, what: str, *, hint: str = "") -> AsyncIterator[None]:
    """While the block runs: `⠋ 0:00:12 waiting for WHAT` on stderr, when stderr is a terminal
    and the output is for people; cleared at the end."""
    if obj.machine or not sys.stderr.isatty():
        yield
        return
    from rich.console import Console
    from datetime import timedelta

    from rich.progress import Progress, SpinnerColumn, TextColumn

    started = time.monotonic()

    def text() -> str:
        # One column, the time first: a narrow terminal crops the end of the line, never the time.
        waited = time.monotonic() - started
        late = hint and waited >= HINT_AFTER
        return f"{timedelta(seconds=int(waited))} waiting for {what}" + (f" ({hint})" if late else "")

    columns = (SpinnerColumn(), TextColumn("{task.description}", markup=False))
    with Progress(*columns, console=Console(file=sys.stderr), transient=True, auto_refresh=False) as spinner:
        task = spinner.add_task(text(), total=None)
        async with redrawn(spinner, lambda: spinner.update(task, description=text())):
            yield


@contextlib.asynccontextmanager
async def redrawn(progress, before=lambda: None) -> AsyncIterator[None]:
    """Redraw a rich Progress made with `auto_refresh=False` every frame, from a task of the
    command's event loop: rich's own refresh thread would not write to the streams of a
    command run by the warm helper (a thread does not inherit the invocation's context)."""

    async def redraw() -> None:
        while True:
            before()
            progress.refresh()
            await asyncio.sleep(_FRAME)

    drawing = asyncio.get_running_loop().create_task(redraw())
    try:
        yield
    finally:
        drawing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drawing
