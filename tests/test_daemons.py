"""The daemons as an operator meets them: bad configs, lost hosts."""

import asyncio
import sys

import pytest

import lab as corral_lab


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


async def test_a_silent_host_becomes_unreachable_and_recovers(corral, lab):
    await corral_lab.set_host_link(lab.name, "n3", up=False)
    try:
        async with asyncio.timeout(20):
            while (await corral.json("node", "show", "n3"))["state"] != "unreachable":
                await asyncio.sleep(0.5)
        refused = await corral("ct", "create", "on-lost", "-t", "busybox", "--node", "n3", check=False)
        assert refused.returncode == 5 and "unreachable" in refused.stderr
    finally:
        await corral_lab.set_host_link(lab.name, "n3", up=True)
    async with asyncio.timeout(30):
        while (await corral.json("node", "show", "n3"))["state"] != "ready":
            await asyncio.sleep(0.5)
