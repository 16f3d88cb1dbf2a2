"""The README cannot drift: every `corral` command it shows in its quick start and its
command table runs against a lab, in the order shown, and succeeds."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
from pathlib import Path

import yaml

README = Path(__file__).resolve().parents[1] / "README.md"
CORRAL = Path(sys.executable).parent / "corral"
# Placeholders a reader fills in: OP is the newest operation's id (from `corral ops ls`).
OPERATION = "OP"
# Created by the commands below; destroyed afterwards whatever happened.
CONTAINERS = ("web3", "db3")


def quick_start_commands(text: str) -> list[str]:
    """The `corral ...` lines of the sh block that follows "After `make demo`"."""
    after = text.split("After `make demo`", 1)[1]
    block = after.split("```sh", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip().startswith("corral ")]


def table_commands(text: str) -> list[str]:
    """The examples in the first column of the command table (the table headed `example`)."""
    section = text.split("### Command line", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    commands = []
    for row in rows:
        first_cell = row.split(" | ", 1)[0]
        commands += [c for c in re.findall(r"`([^`]+)`", first_cell) if c.startswith("corral")]
    return commands


def test_the_readme_shows_commands_to_run():
    text = README.read_text()
    assert len(quick_start_commands(text)) >= 3
    table = table_commands(text)
    assert len(table) >= 20, table
    for command in table:
        assert not re.search(r"\b(NAME|NODE|ID)\b|\\\||\[", command), f"not a runnable example: {command}"


async def _corral(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env, cwd=cwd,
    )  # fmt: skip
    async with asyncio.timeout(300):
        out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


async def test_every_readme_command_runs_against_a_lab(lab, corral, tmp_path):
    text = README.read_text()
    # The operator's own config, as `corral lab up` leaves it: the lab's context, current.
    config = tmp_path / ".config" / "corral" / "config.yaml"
    config.parent.mkdir(parents=True)
    context = {f"lab-{lab.name}": yaml.safe_load(lab.cli_config.read_text())}
    config.write_text(yaml.safe_dump({"current-context": f"lab-{lab.name}", "contexts": context}))
    env = {k: v for k, v in os.environ.items() if k not in ("CORRAL_CONFIG", "CORRAL_CONTEXT")}
    env["HOME"] = str(tmp_path)
    env["CORRAL_HELPER_IDLE"] = "5"  # the warm helper these commands start (one per HOME) ends soon after
    ran = []
    try:
        for command in table_commands(text) + quick_start_commands(text):
            words = shlex.split(command)
            if words[1:3] in (["lab", "up"], ["lab", "down"]):
                continue  # a lab of its own: the demo runs them end to end in CI (.ci/run)
            words = [lab.name if w == "demo" and words[1] == "lab" else f"lab-{lab.name}" if w == "lab-demo" else w
                     for w in words]  # fmt: skip
            if OPERATION in words:
                newest = max((await corral.json("ops", "ls")), key=lambda op: op["created_at"])
                words = [newest["id"] if w == OPERATION else w for w in words]
            code, out, err = await _corral([str(CORRAL), *words[1:]], env, tmp_path)
            assert code == 0, f"README: `{command}` exited {code}: {err.strip() or out.strip()}"
            ran.append(command)
    finally:
        async with asyncio.timeout(120):  # what the README started (and cancelled) ends first
            while await corral.json("ops", "ls", "--active"):
                await asyncio.sleep(0.5)
        for name in CONTAINERS:
            await corral("ct", "destroy", "--force", name, check=False)
    assert len(ran) >= 20
