#!/usr/bin/env python3
"""List the fleet's nodes and containers.

    python examples/list_fleet.py [CONFIG_OR_CONTEXT]

CONFIG_OR_CONTEXT: a `corral` CLI config file, or a context of the default one
(default: the CLI's own choice, as `corral node ls` makes it).
"""

import asyncio
import sys

from corral.client import Client, CorralError


async def main(config: str | None) -> None:
    async with Client.from_config(config) as fleet:
        for node in await fleet.list_nodes():
            flags = ",cordoned" if node.cordoned else ""
            labels = " ".join(f"{k}={v}" for k, v in sorted(node.facts.labels.items()))
            print(f"node {node.name} {node.state.value}{flags} containers={node.container_count} {labels}".rstrip())
        for ct in await fleet.list_containers():
            print(f"container {ct.name} on {ct.node}: {ct.state.value} {ct.network.ipv4 or '-'}")


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
    except CorralError as exc:  # every error of the API: NotFound, Unavailable, ConfigError...
        sys.exit(f"error: {exc}")
