"""The kernel watchdog, against a regular file standing in for the device (never /dev/watchdog here:
opening it would arm it and reset this machine): armed at the first valid lease, petted only while
the lease holds, silent once it runs out, disarmed with 'V' on a clean stop only."""

import asyncio
from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.lease import Lease
from agent.watchdog import MAGIC_CLOSE, KernelWatchdog, Watchdog
from corral.errors import ConfigError
from sim.clock import SimulatedLoop, run_simulated


def pets(device: Path) -> int:
    return device.read_bytes().count(b"\0")


def play(tmp_path: Path, script):
    """Run `script(loop, lease, watchdog, device)` on simulated time: a lease renewed at 0 for 5 s
    (valid until 4, the agent's margin), a watchdog petting every second."""
    device = tmp_path / "watchdog"
    device.write_bytes(b"")

    async def main(loop: SimulatedLoop):
        async def fence(names):
            pass

        lease = Lease(tmp_path / "lease.json", fence, clock=loop.time, boot="b")
        watchdog = Watchdog(KernelWatchdog(device, 10), lease.valid, timeout=10, pet_every=1.0)
        task = asyncio.create_task(watchdog.run())
        try:
            return await script(loop, lease, watchdog, device)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    return run_simulated(main)


def test_not_armed_before_the_first_lease_then_petted_only_while_it_holds(tmp_path):
    async def script(loop, lease, watchdog, device):
        await asyncio.sleep(30)
        assert not watchdog.armed and device.read_bytes() == b""  # never reached a controller: no reset loop
        await lease.renewed(loop.time(), 5.0, ["db"])  # valid until 30 + 5 - 1
        await asyncio.sleep(10)
        held = pets(device)
        assert watchdog.armed and 4 <= held <= 5
        await asyncio.sleep(20)
        assert pets(device) == held  # run out: no more pets, the host resets `timeout` later
        await lease.renewed(loop.time(), 5.0, ["db"])  # renewed in time after all: petted again
        await asyncio.sleep(2)
        assert pets(device) > held
        watchdog.close()  # a clean stop
        assert device.read_bytes().endswith(MAGIC_CLOSE) and not watchdog.armed

    play(tmp_path, script)


def test_a_crashed_or_hung_agent_leaves_it_armed(tmp_path):
    async def script(loop, lease, watchdog, device):
        await lease.renewed(loop.time(), 5.0, ["db"])
        await asyncio.sleep(2)
        return watchdog

    watchdog = play(tmp_path, script)  # the pet loop is cancelled, as a dying agent's would be
    assert watchdog.armed and MAGIC_CLOSE not in (tmp_path / "watchdog").read_bytes()
    watchdog.device.disarm()  # tidy: close the file


def test_a_device_that_cannot_set_its_timeout_is_still_used(tmp_path):
    device = tmp_path / "plain"
    device.write_bytes(b"")
    kernel = KernelWatchdog(device, 10)
    kernel.arm()  # a regular file answers the ioctl with ENOTTY: a warning, it keeps its own timeout
    kernel.pet()
    kernel.disarm()
    assert device.read_bytes() == b"\0" + MAGIC_CLOSE


def _agent(tmp_path: Path, extra: str) -> Path:
    for name in ("ca.crt", "c.crt", "c.key"):
        (tmp_path / name).write_text("x")
    path = tmp_path / "agent.yaml"
    path.write_text("node: n1\nlisten: 127.0.0.1:7701\ncontroller: 127.0.0.1:7700\n"
                    "tls: {ca: ca.crt, cert: c.crt, key: c.key}\n" + extra)  # fmt: skip
    return path


def test_the_watchdog_is_off_by_default_and_a_bad_device_is_a_clear_startup_error(tmp_path):
    assert AgentConfig.load(_agent(tmp_path, "")).watchdog_device is None
    assert AgentConfig.load(_agent(tmp_path, "watchdog_device: ''\n")).watchdog_device is None
    # A character device passes (checked with stat only: nothing is opened at load).
    config = AgentConfig.load(_agent(tmp_path, "watchdog_device: /dev/null\nwatchdog_timeout: 20\n"))
    assert config.watchdog_device == Path("/dev/null") and config.watchdog_timeout == 20
    with pytest.raises(ConfigError, match=r"agent.yaml:5: watchdog_device: .*/nowhere: No such file"):
        AgentConfig.load(_agent(tmp_path, f"watchdog_device: {tmp_path}/nowhere\n"))
    with pytest.raises(ConfigError, match=r"watchdog_device: .* is not a character device"):
        AgentConfig.load(_agent(tmp_path, f"watchdog_device: {tmp_path / 'ca.crt'}\n"))
    with pytest.raises(ConfigError, match=r"watchdog_timeout: 1 is not between 2 and 600 seconds"):
        AgentConfig.load(_agent(tmp_path, "watchdog_device: /dev/null\nwatchdog_timeout: 1\n"))
