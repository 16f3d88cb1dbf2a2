"""Wait until the controller reports every lab node ready, asking through the CLI.

Contract with the CLI: `python -m controller.cli.main --config CLI_YAML
--output json node ls` prints a JSON list of objects with at least "name" and
"state" ("ready" once the node has registered and heartbeats).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import structlog

from corral.errors import CorralError, RuntimeFailure
from corral.proc import run

log = structlog.get_logger("lab.readiness")

READY_TIMEOUT = 30.0
_ATTEMPT_TIMEOUT = 10.0
_POLL = 0.5


def node_ls_argv(cli_config: Path) -> list[str]:
    return [sys.executable, "-m", "controller.cli.main", "--config", str(cli_config), "--output", "json",
            "node", "ls"]


def parse_node_list(stdout: str) -> dict[str, str]:
    """name -> state from `node ls` JSON output; ValueError if it is not that shape."""
    value = json.loads(stdout)
    if not isinstance(value, list):
        raise ValueError("expected a JSON list")
    states = {}
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError("expected objects with a 'name'")
        states[item["name"]] = str(item.get("state", ""))
    return states


async def wait_nodes_ready(
    cli_config: Path,
    nodes: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = READY_TIMEOUT,
    check_alive: Callable[[], str | None] = lambda: None,
) -> None:
    """Poll `node ls` until every node in `nodes` is "ready".

    `check_alive` returns a message when a lab daemon has died (then waiting is
    pointless and we fail at once with that message)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = "no answer yet"
    while True:
        dead = check_alive()
        if dead:
            raise RuntimeFailure(dead)
        try:
            result = await run(node_ls_argv(cli_config), timeout=_ATTEMPT_TIMEOUT, check=False,
                               env=dict(env) if env is not None else None, what="node ls")
            if result.returncode == 0:
                states = parse_node_list(result.stdout.decode())
                not_ready = [n for n in nodes if states.get(n) != "ready"]
                if not not_ready:
                    return
                last = "not ready: " + ", ".join(f"{n} ({states.get(n, 'absent')})" for n in not_ready)
            else:
                last = (result.output or f"exit {result.returncode}").splitlines()[-1]
        except (ValueError, CorralError) as e:
            last = str(e)
        if loop.time() >= deadline:
            raise RuntimeFailure(f"lab nodes not ready after {timeout:g} s; last `node ls`: {last}")
        log.debug("waiting for nodes", status=last)
        await asyncio.sleep(_POLL)

