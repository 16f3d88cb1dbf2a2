"""An interactive exec (`corral ct exec -i/-t`, `corral ct enter`, `corral ct file`): what starts
it and what the caller sends while it runs. The command's output and end are corral.proc's
`Output` and `Exited`, as for a plain exec.

With a terminal (`tty`) the command runs on a pseudo-terminal of the given size: its output
comes as stdout only, `Resize` changes the size (the container's processes get SIGWINCH),
and a byte such as ^C is the terminal's to turn into a signal. `timeout` 0 means none: the
command lives as long as the caller's stream (it is killed, with what it started, when the
caller goes away)."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Mapping, Union

from corral.errors import InvalidArgument
from corral.names import validate_name
from corral.proc import EXEC_MAX_TIMEOUT, validate_command

# What one stdin message carries at most (gRPC's default message limit is 4 MiB).
STDIN_CHUNK = 1 << 20
MAX_TERMINAL_SIDE = 10_000  # rows or columns
# Signals a caller may send: the ones a terminal or a shell's user sends, not the ones that
# report faults (SIGSEGV...) or that only the kernel should raise.
ALLOWED_SIGNALS = frozenset({
    signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGKILL, signal.SIGUSR1, signal.SIGUSR2,
    signal.SIGTERM, signal.SIGCONT, signal.SIGSTOP, signal.SIGTSTP, signal.SIGWINCH,
})  # fmt: skip


@dataclass(frozen=True)
class TerminalSize:
    rows: int
    cols: int


@dataclass(frozen=True)
class ExecStart:
    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    timeout: int = 0
    tty: bool = False
    size: TerminalSize | None = None


@dataclass(frozen=True)
class StdinData:
    data: bytes


@dataclass(frozen=True)
class StdinClosed:
    """End of the caller's standard input."""


@dataclass(frozen=True)
class Resize:
    size: TerminalSize


@dataclass(frozen=True)
class SendSignal:
    signum: int


ExecInputEvent = Union[StdinData, StdinClosed, Resize, SendSignal]


def validate_size(size: TerminalSize) -> TerminalSize:
    if not (0 < size.rows <= MAX_TERMINAL_SIDE and 0 < size.cols <= MAX_TERMINAL_SIDE):
        raise InvalidArgument(f"terminal size {size.rows}x{size.cols}: rows and columns must be 1-{MAX_TERMINAL_SIDE}")
    return size


def validate_start(start: ExecStart) -> ExecStart:
    validate_name(start.name)
    validate_command(start.argv, start.env)
    if not 0 <= start.timeout <= EXEC_MAX_TIMEOUT:
        raise InvalidArgument(f"exec timeout must be between 0 and {EXEC_MAX_TIMEOUT} seconds")
    if start.size is not None:
        if not start.tty:
            raise InvalidArgument("a terminal size is for an exec with a terminal (tty)")
        validate_size(start.size)
    return start


def validate_input(event: ExecInputEvent, tty: bool) -> ExecInputEvent:
    if isinstance(event, Resize):
        if not tty:
            raise InvalidArgument("a resize is for an exec with a terminal (tty)")
        validate_size(event.size)
    elif isinstance(event, SendSignal) and event.signum not in ALLOWED_SIGNALS:
        raise InvalidArgument(
            f"signal {event.signum} may not be sent; one of: {', '.join(s.name for s in sorted(ALLOWED_SIGNALS))}"
        )
    elif isinstance(event, StdinData) and len(event.data) > STDIN_CHUNK:
        raise InvalidArgument(f"a piece of standard input is over {STDIN_CHUNK >> 20} MiB")
    return event
