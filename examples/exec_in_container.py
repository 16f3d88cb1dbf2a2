#!/usr/bin/env python3
"""Create a container, run a command in it with its output streamed as it comes, destroy it.

    python examples/exec_in_container.py [CONFIG_OR_CONTEXT] [--name NAME] [--node NODE]
"""

import argparse
import asyncio
import sys

from corral.client import Client, CorralError, Exited, Limits

SCRIPT = "for i in 1 2 3; do echo line $i; sleep 0.3; done; echo warning >&2; exit 3"


async def main(args: argparse.Namespace) -> int:
    async with Client.from_config(args.config) as fleet:
        ct = await fleet.create_container(args.name, "busybox", node=args.node, start=True,
                                          limits=Limits(memory_bytes=64 << 20))  # fmt: skip
        print(f"created {ct.name} on {ct.node}: {ct.state.value}", flush=True)
        try:
            async for event in fleet.exec_stream(ct.name, ["sh", "-c", SCRIPT], timeout=60):
                if isinstance(event, Exited):
                    print(f"exit code {event.returncode}", flush=True)
                else:  # Output: a piece of stdout (fd 1) or stderr (fd 2), as it was written
                    stream = "stdout" if event.fd == 1 else "stderr"
                    for line in event.data.decode(errors="replace").splitlines():
                        print(f"{stream}: {line}", flush=True)
        finally:
            await fleet.destroy_container(ct.name, force=True)
            print(f"destroyed {ct.name}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="CLI config file or context (default: the CLI's)")
    parser.add_argument("--name", default="example-exec")
    parser.add_argument("--node", default="", help="default: the scheduler chooses")
    try:
        sys.exit(asyncio.run(main(parser.parse_args())))
    except CorralError as exc:
        sys.exit(f"error: {exc}")
