#!/usr/bin/env python3
"""Hold a conversation with a command in a container: send a line, read its answer, send the
next (an interactive exec: input goes as it is produced, not all at the start).

    python examples/converse.py NAME [CONFIG_OR_CONTEXT]
"""

import argparse
import asyncio
import sys

from corral.client import Client, CorralError, ExecStart, Exited, StdinClosed, StdinData

# Reads lines and answers each at once: what a REPL or a line protocol looks like.
ANSWERER = 'while read -r a b; do echo "$a + $b = $((a + b))"; done; echo bye'


async def main(args: argparse.Namespace) -> int:
    questions = [(1, 2), (20, 22), (300, 400)]
    inputs: asyncio.Queue = asyncio.Queue()

    async def feed():
        while (item := await inputs.get()) is not None:
            yield item

    async with Client.from_config(args.config) as fleet:
        events = fleet.exec_interactive(ExecStart(args.name, ("sh", "-c", ANSWERER), timeout=60), feed())
        await inputs.put(StdinData(b"%d %d\n" % questions[0]))
        asked = 1
        async for event in events:
            if isinstance(event, Exited):
                print(f"exit code {event.returncode}")
                return event.returncode
            for line in event.data.decode().splitlines():
                print(f"answer: {line}", flush=True)
                if asked < len(questions):  # the next question only once this one is answered
                    await inputs.put(StdinData(b"%d %d\n" % questions[asked]))
                    asked += 1
                elif line != "bye":
                    await inputs.put(StdinClosed())
                    await inputs.put(None)
    return 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a running container")
    parser.add_argument("config", nargs="?", help="CLI config file or context (default: the CLI's)")
    try:
        sys.exit(asyncio.run(main(parser.parse_args())))
    except CorralError as exc:
        sys.exit(f"error: {exc}")
