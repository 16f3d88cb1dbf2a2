#!/usr/bin/env python3
"""Watch the fleet's events as they happen, resuming after the controller goes away.

    python examples/watch_events.py [CONFIG_OR_CONTEXT] [--since SEQ] [--count N] [--no-follow]

corral-failoverd (controller/failoverd.py) watches the same stream to learn of lost nodes.
"""

import argparse
import asyncio
import sys

from corral.client import Client, CorralError, Unavailable


async def main(args: argparse.Namespace) -> None:
    since, seen = args.since, 0
    async with Client.from_config(args.config) as fleet:
        while True:
            try:
                async for event in fleet.watch_events(since, follow=args.follow):
                    since = event.seq  # where to resume
                    where = " ".join(f"{k}={v}" for k, v in (("node", event.node), ("container", event.container),
                                                             ("op", event.operation)) if v)  # fmt: skip
                    print(f"{event.seq} {event.kind} {where} {event.message}", flush=True)
                    seen += 1
                    if args.count and seen >= args.count:
                        return
                return  # without --follow: the kept events have all come
            except Unavailable as exc:  # the controller restarted or the link broke: watch again
                print(f"# stream ended ({exc}); resuming after {since}", file=sys.stderr)
                if "missed events" in exc.message:
                    since = 0
                await asyncio.sleep(1.0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="CLI config file or context (default: the CLI's)")
    parser.add_argument("--since", type=int, default=0, help="only events after this one (0: all kept)")
    parser.add_argument("--count", type=int, default=0, help="stop after this many events (0: never)")
    parser.add_argument("--follow", action=argparse.BooleanOptionalAction, default=True)
    try:
        asyncio.run(main(parser.parse_args()))
    except CorralError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        pass
