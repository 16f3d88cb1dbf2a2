"""A spinner for a long wait with nothing to measure (a `ct create` that builds its template):
on a terminal, what the command waits for and for how long, on stderr; nothing otherwise."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator

# A hint joins the line once the wait has lasted this long.
HINT_AFTER = 5.0


@contextlib.contextmanager
def waiting(obj, what: str, *, hint: str = "") -> Iterator[None]:
    """While the block runs: `⠋ waiting for WHAT  0:00:12` on stderr, when stderr is a
    terminal and the output is for people; cleared at the end."""
    if obj.machine or not sys.stderr.isatty():
        yield
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    class _Hinted(TextColumn):
        def render(self, task):
            text = f"waiting for {what}"
            if hint and time.monotonic() - started >= HINT_AFTER:
                text += f" ({hint})"
            self.text_format = text
            return super().render(task)

    started = time.monotonic()
    columns = (SpinnerColumn(), _Hinted(""), TimeElapsedColumn())
    with Progress(*columns, console=Console(file=sys.stderr), transient=True) as spinner:
        spinner.add_task(what, total=None)
        yield
