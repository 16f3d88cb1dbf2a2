"""The daemons as an operator meets them: bad configs, lost hosts."""

import asyncio
import sys

import pytest

import lab as corral_lab
from conftest import events_of


@pytest.mark.parametrize("daemon", ["agent.main", "controller.main"])
async def test_daemon_with_malformed_config_says_file_and_line(tmp_path, daemon):
    config = tmp_path / "broken.yaml"
    config.write_text("listen: [\"127.0.0.1:7000\"]\ntls:\n  ca: ca.crt\n   cert: x\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", daemon, "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 78
    message = err.decode().strip()
    assert message.count("\n") == 0, message  # one line, no traceback
    assert f"{config}:4: invalid YAML" in message


async def test_a_silent_host_is_suspect_then_dead_and_every_change_is_an_event(corral, lab):
    since = max([e["seq"] for e in await events_of(corral)] or [0])
    await corral_lab.set_host_link(lab.name, "n3", up=False)
    try:
        async with asyncio.timeout(20):
            while (shown := await corral.json("node", "show", "n3"))["state"] != "suspect":
                await asyncio.sleep(0.3)
        assert "nothing is moved off it" in shown["health"]
        refused = await corral("ct", "create", "on-lost", "-t", "busybox", "--node", "n3", check=False)
        assert refused.returncode == 5 and "suspect" in refused.stderr
        async with asyncio.timeout(20):  # its lease (5 s) and the margin (2 s) run out, then the fence
            while (shown := await corral.json("node", "show", "n3"))["state"] != "fenced":
                await asyncio.sleep(0.3)
        assert "proven off" in shown["health"]
    finally:
        await corral_lab.set_host_link(lab.name, "n3", up=True)
    await corral_lab.power_on(lab.name, "n3")  # the lab's fence command powered it off
    async with asyncio.timeout(30):
        while (await corral.json("node", "show", "n3"))["state"] != "ready":
            await asyncio.sleep(0.5)
    seen = [e["fields"]["state"] for e in await events_of(corral, since) if e.get("node") == "n3"
            and e["kind"] == "node-state"]  # fmt: skip
    assert seen == ["suspect", "dead", "fenced", "ready"], seen
    text = (await corral("events", "--no-follow", "--since", str(since))).stdout
    assert "node n3 is dead" in text and "node n3 is fenced: fence command" in text and "node n3 is ready" in text
