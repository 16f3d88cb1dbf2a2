"""Interactive exec on this host: a command in a running container, fed by the caller's
stream (stdin, terminal sizes, signals) while its output streams back.

The caller's stream ending closes a pipe input (end of file), not the command: a command
that still runs is killed when the caller goes away (the RPC ends) or its timeout passes; an
invalid message kills it and fails the call. A kill takes what it started in the container."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

import structlog

from agent.containers import ContainerManager
from agent.runtime.terminal import AttachedCommand
from corral.errors import FailedPrecondition
from corral.exec_session import ExecInputEvent, ExecStart, Resize, SendSignal, StdinClosed, StdinData, validate_input
from corral.exec_session import validate_start
from corral.proc import Exited, Output

log = structlog.get_logger("corral.agent.interactive")


class InteractiveExec:
    def __init__(self, containers: ContainerManager) -> None:
        self.containers = containers

    async def run(self, start: ExecStart, inputs: AsyncIterator[ExecInputEvent]) -> AsyncIterator[Output | Exited]:
        validate_start(start)
        self.containers.record(start.name)  # NotFound for a container this host does not have
        runtime = self.containers.runtime
        if start.name not in runtime.running_names():
            raise FailedPrecondition(f"container {start.name!r} is not running")
        argv = runtime.attach_argv(start.name, start.argv, dict(start.env))
        command = await AttachedCommand.start(argv, tty=start.tty, size=start.size, timeout=start.timeout)
        bound = log.bind(container=start.name, pid=command.process.pid, tty=start.tty)
        bound.info("interactive exec started", command=start.argv[0])
        feeding = asyncio.create_task(_feed(command, inputs, start.tty))
        try:
            async for event in command.events():
                if isinstance(event, Exited):
                    if feeding.done() and not feeding.cancelled() and feeding.exception() is not None:
                        raise feeding.exception()  # the caller sent something invalid: it was killed for that
                    bound.info("interactive exec ended", exit_code=event.returncode, timed_out=event.timed_out)
                yield event
        finally:
            feeding.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await feeding
            await command.close()


async def _feed(command: AttachedCommand, inputs: AsyncIterator[ExecInputEvent], tty: bool) -> None:
    try:
        async for event in inputs:
            validate_input(event, tty)
            if isinstance(event, StdinData):
                await command.write(event.data)
            elif isinstance(event, StdinClosed):
                command.close_stdin()
            elif isinstance(event, Resize):
                command.resize(event.size)
            elif isinstance(event, SendSignal):
                await command.signal(event.signum)
        if not tty:
            command.close_stdin()  # the caller sends no more: end of file, as a closed pipe
    except Exception:
        command.kill()
        raise
