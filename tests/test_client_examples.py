"""The typed Python client (corral.client) and its examples (examples/), run against the lab
as a user would run them: each example a subprocess given the lab's CLI config."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from conftest import CliResult, events_of

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


async def example(script: str, *args: str, timeout: float = 300) -> tuple[CliResult, list[tuple[float, str]]]:
    """Run examples/SCRIPT; its result, and each line of its stdout with when it came."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / script), *args, cwd=EXAMPLES.parent,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    lines: list[tuple[float, str]] = []

    async def read() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            lines.append((time.monotonic(), raw.decode().rstrip("\n")))

    async with asyncio.timeout(timeout):
        _, err = await asyncio.gather(read(), proc.stderr.read())  # type: ignore[union-attr]
        await proc.wait()
    result = CliResult(proc.returncode or 0, "\n".join(text for _, text in lines), err.decode())
    return result, lines


def ok(result: CliResult) -> str:
    assert result.returncode == 0, f"exited {result.returncode}: {result.stderr.strip()}\n{result.stdout}"
    return result.stdout


async def test_list_fleet_prints_every_node_and_container(lab, corral, cleanup):
    cleanup.append("exlist1")
    await corral("ct", "create", "exlist1", "-t", "busybox", "--node", "n2")
    out = ok((await example("list_fleet.py", str(lab.cli_config)))[0])
    for node in ("n1", "n2", "n3"):
        assert f"node {node} ready" in out
    assert "container exlist1 on n2: stopped" in out


async def test_exec_example_streams_the_output_as_it_is_written(lab, cleanup):
    cleanup.append("exexec1")
    result, lines = await example("exec_in_container.py", str(lab.cli_config), "--name", "exexec1", "--node", "n1")
    ok(result)
    texts = [text for _, text in lines]
    assert texts[0] == "created exexec1 on n1: running"
    assert texts[1:4] == ["stdout: line 1", "stdout: line 2", "stdout: line 3"]
    assert texts[4:] == ["stderr: warning", "exit code 3", "destroyed exexec1"]
    # The script sleeps 0.3 s between lines: they came as written, not all at the end.
    assert lines[3][0] - lines[1][0] >= 0.4


async def test_watch_events_example_prints_new_events(lab, corral):
    kept = await events_of(corral)
    last = kept[-1]["seq"] if kept else 0
    watcher = asyncio.create_task(
        example("watch_events.py", str(lab.cli_config), "--since", str(last), "--count", "2", timeout=60))
    try:
        await corral("node", "cordon", "n3")
    finally:
        await corral("node", "uncordon", "n3")
    out = ok((await watcher)[0]).splitlines()
    assert len(out) == 2
    assert out[0].startswith(f"{last + 1} node-cordon node=n3 ") and "cordoned" in out[0]
    assert out[1].split()[1:3] == ["node-cordon", "node=n3"] and "uncordoned" in out[1]


async def test_migrate_example_follows_the_operation_to_its_end(lab, corral, cleanup):
    cleanup.append("exmig1")
    await corral("ct", "create", "exmig1", "-t", "busybox", "--node", "n1", "--start")
    result, lines = await example("migrate.py", str(lab.cli_config), "exmig1", "--to", "n2")
    out = ok(result).splitlines()
    assert out[0].startswith("migrating exmig1 from n1 (")
    op_id = out[0].split("(")[1].rstrip(")")
    assert all(line.startswith(f"{op_id} ") for line in out[1:-1]) and len(out) > 2
    assert out[-2].startswith(f"{op_id} succeeded")
    assert out[-1].startswith("succeeded: exmig1 is on n2 (running)")
    assert (await corral.json("ct", "show", "exmig1"))["node"] == "n2"


async def test_errors_are_corral_errors_and_results_are_dataclasses(lab):
    from corral.client import Client, Moves, NodeCheck, NotFound, Operation

    async with Client.from_config(lab.cli_config) as fleet:
        with pytest.raises(NotFound):
            await fleet.get_container("exnone")
        with pytest.raises(NotFound):
            await fleet.get_operation("mig-00000000000000-000000")
        ops = await fleet.list_operations()
        assert all(isinstance(op, Operation) for op in ops)
        events = [e async for e in fleet.watch_events(0, follow=False)]
        assert events and events[-1].seq >= events[0].seq
        checks = await fleet.check_fleet()
        assert {c.node for c in checks} == {"n1", "n2", "n3"} and all(isinstance(c, NodeCheck) for c in checks)
        plan = await fleet.rebalance_fleet()
        assert isinstance(plan, Moves) and plan.operation is None


async def test_converse_example_sends_each_line_after_the_last_answer(lab, corral, cleanup):
    cleanup.append("exconv1")
    await corral("ct", "create", "exconv1", "-t", "busybox", "--node", "n1", "--start")
    out = ok((await example("converse.py", "exconv1", str(lab.cli_config), timeout=120))[0])
    assert out.splitlines() == ["answer: 1 + 2 = 3", "answer: 20 + 22 = 42", "answer: 300 + 400 = 700",
                                "answer: bye", "exit code 0"]  # fmt: skip
