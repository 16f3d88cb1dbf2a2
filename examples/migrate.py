#!/usr/bin/env python3
"""Migrate a container and follow the operation to its end.

    python examples/migrate.py [CONFIG_OR_CONTEXT] NAME [--to NODE] [--live]

Exits 0 when the migration succeeded, 1 when it failed (and was rolled back) or was cancelled.
"""

import argparse
import asyncio
import sys

from corral.client import Client, CorralError, Operation


def show(op: Operation) -> None:
    step = op.steps[-1] if op.steps else None
    print(f"{op.id} {op.state}" + (f" step={step.name}:{step.state}" if step else "")
          + (f" phase={op.progress.phase}" if op.progress.phase else ""), flush=True)  # fmt: skip


async def main(args: argparse.Namespace) -> int:
    async with Client.from_config(args.config) as fleet:
        before = await fleet.get_container(args.name)
        # Not safe to send twice: if this call fails with Unavailable, look with
        # list_operations(name, active_only=True) before asking again.
        op = await fleet.migrate(args.name, args.to, live=args.live)
        print(f"migrating {args.name} from {before.node} ({op.id})", flush=True)
        done = await fleet.wait_operation(op.id, on_change=show)
        after = await fleet.get_container(args.name)
        if done.succeeded:
            timings = " ".join(f"{k}={v:.0f}ms" for k, v in sorted(done.timings_ms.items()))
            print(f"succeeded: {args.name} is on {after.node} ({after.state.value}) {timings}".rstrip())
            return 0
        print(f"{done.state}: {done.error or 'cancelled'}; {args.name} is on {after.node}")
        return 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="CLI config file or context (default: the CLI's)")
    parser.add_argument("name")
    parser.add_argument("--to", default="", help="the target node (default: the scheduler chooses)")
    parser.add_argument("--live", action="store_true", help="keep the processes running (CRIU)")
    try:
        sys.exit(asyncio.run(main(parser.parse_args())))
    except CorralError as exc:
        sys.exit(f"error: {exc}")
