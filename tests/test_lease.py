"""The agent's lease on a simulated clock: renewed by heartbeats, and when it runs out the HA
containers are fenced once, before the controller could count the lease as expired."""

import asyncio
import json

import pytest

from agent.lease import MARGIN, Lease


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def fenced():
    return []


def lease_at(tmp_path, clock, fenced, boot="boot-1"):
    async def fence(names):
        fenced.append((clock.t, names))

    return Lease(tmp_path / "lease.json", fence, clock=clock, boot=boot)


async def run_guard_until(lease, clock, until: float, step: float = 0.25):
    guard = asyncio.create_task(lease.guard())
    try:
        while clock.t < until:
            clock.t += step
            lease._changed.set()  # wake the guard to look at the new time
            await asyncio.sleep(0)
            await asyncio.sleep(0)
    finally:
        guard.cancel()


async def test_a_lease_that_runs_out_fences_the_ha_containers_once_and_early(tmp_path, fenced):
    clock = Clock()
    lease = lease_at(tmp_path, clock, fenced)
    await lease.renewed(sent_at=100.0, lease_seconds=5.0, ha=["db", "web"])
    await run_guard_until(lease, clock, 103.5)
    assert fenced == []  # renewed lease still valid
    await run_guard_until(lease, clock, 110.0)
    assert len(fenced) == 1 and fenced[0][1] == ["db", "web"]
    assert fenced[0][0] <= 100.0 + 5.0 - MARGIN + 0.25  # given up before the controller's count ends
    await lease.renewed(sent_at=110.0, lease_seconds=5.0, ha=["db"])  # the controller answers again
    assert not lease.fenced
    await run_guard_until(lease, clock, 120.0)
    assert [names for _, names in fenced] == [["db", "web"], ["db"]]


async def test_a_restarted_agent_trusts_no_lease_it_has_lost(tmp_path, fenced):
    clock = Clock()
    lease = lease_at(tmp_path, clock, fenced)
    await lease.renewed(sent_at=100.0, lease_seconds=5.0, ha=["db"])
    clock.t = 200.0  # the agent was down well past its lease
    again = lease_at(tmp_path, clock, fenced)
    await run_guard_until(again, clock, 200.5)
    assert fenced == [(200.25, ["db"])]


@pytest.mark.parametrize("content", ["{not json", json.dumps({"expires": 1e12, "ha": ["db"], "boot": "boot-0"})])
async def test_an_unreadable_lease_or_one_from_before_a_reboot_counts_as_lost(tmp_path, fenced, content):
    (tmp_path / "lease.json").write_text(content)
    clock = Clock()
    lease = lease_at(tmp_path, clock, fenced)
    assert lease.remaining() is not None and lease.remaining() <= 0


async def test_no_lease_no_fencing(tmp_path, fenced):
    clock = Clock()
    lease = lease_at(tmp_path, clock, fenced)  # never registered since it started
    await run_guard_until(lease, clock, 120.0)
    assert fenced == [] and lease.remaining() is None
