"""The version-skew rule (corral/compat.py) and the controller's gate on RegisterNode."""

from __future__ import annotations

import asyncio
import json

import pytest

import lab as corral_lab
from conftest import events_of, running_copies, until
from corral.compat import agent_compatibility, controller_version, parse


@pytest.mark.parametrize("agent", ["1.4.0", "1.4.9", "1.3.0", "1.3.7", "1.4.0rc1", "1.4"])
def test_same_major_and_this_or_previous_minor_is_accepted(agent):
    verdict = agent_compatibility(agent, "1.4.2")
    assert verdict.ok and bool(verdict), verdict.reason
    assert agent in verdict.reason and "1.3 or 1.4" in verdict.reason


@pytest.mark.parametrize(("agent", "why"), [
    ("2.4.0", "another major version"),
    ("0.4.0", "another major version"),
    ("1.5.0", "newer than the controller"),
    ("1.2.9", "more than one minor version older"),
    ("unknown", "is not a version"),
    ("", "'unknown' is not a version"),
    ("1", "is not a version"),
    ("one.two", "is not a version"),
    ("unknown (not installed)", "is not a version"),
])  # fmt: skip
def test_other_versions_are_refused_with_the_reason(agent, why):
    verdict = agent_compatibility(agent, "1.4.2")
    assert not verdict.ok and not verdict
    assert why in verdict.reason
    assert "this controller (1.4.2) accepts agents 1.3 or 1.4" in verdict.reason


def test_minor_zero_accepts_only_itself_within_the_major():
    assert agent_compatibility("1.0.3", "1.0.0").ok
    verdict = agent_compatibility("0.9.0", "1.0.0")
    assert not verdict.ok and "accepts agents 1.0" in verdict.reason


def test_an_unparsable_controller_version_refuses_everything():
    verdict = agent_compatibility("0.1.0", "unknown (not installed)")
    assert not verdict.ok and "controller's own version" in verdict.reason


def test_parse():
    assert parse("0.1.0") == (0, 1)
    assert parse(" 3.12.1+local ") == (3, 12)
    assert parse("v1.2") is None


async def _restart_announcing(lab, node: str, version: str | None) -> None:
    await corral_lab.stop_agent(lab.name, node)  # its containers keep running
    await corral_lab.start_agent(lab.name, node, announce_version=version)


async def test_an_agent_one_minor_older_serves_and_an_incompatible_one_is_refused(corral, cleanup, lab):
    major, minor = parse(controller_version())
    older = f"{major}.{minor - 1}.9" if minor else f"{major}.{minor}.0"  # minor 0: only itself is older-compatible
    incompatible = f"{major + 1}.0.0"
    cleanup.append("skew1")

    def n3_ready_at(version):
        async def check():
            node = await corral.json("node", "show", "n3")
            return node["state"] == "ready" and node["facts"]["agent_version"] == version

        return check

    try:
        await _restart_announcing(lab, "n3", older)
        await until(n3_ready_at(older), 30)
        await corral("ct", "create", "skew1", "-t", "busybox", "--node", "n3", "--start")
        assert await running_copies(lab, "skew1") == ["n3"]
        before = (await corral.json("node", "show", "n3"))["last_heartbeat"]
        await asyncio.sleep(2.5)
        after = await corral.json("node", "show", "n3")
        assert after["state"] == "ready" and after["last_heartbeat"] > before  # it heartbeats

        since = max([e["seq"] for e in await events_of(corral)] or [0])
        log_at = lab.host("n3").log_file.stat().st_size
        await _restart_announcing(lab, "n3", incompatible)

        async def refused():
            return [e for e in await events_of(corral, since) if e["kind"] == "node-refused" and e["node"] == "n3"]

        event = (await until(refused, 15))[0]
        assert f"agent version {incompatible} has another major version" in event["message"], event
        assert f"this controller ({controller_version()}) accepts agents" in event["message"], event
        assert event["fields"]["agent_version"] == incompatible

        def agent_says_why():  # the agent logs the reason and keeps trying
            with open(lab.host("n3").log_file, "rb") as f:
                f.seek(log_at)
                records = [json.loads(line) for line in f.read().decode().splitlines() if line.startswith("{")]
            return [r for r in records if "another major version" in r.get("error", "")]

        async def logged_twice():
            return len(agent_says_why()) >= 2

        await until(logged_twice, 10)
        assert len(await refused()) == 1  # one event per node and reason, however often it retries
    finally:
        # Back to its own version before the host is counted dead (and fenced by the lab).
        await corral_lab.stop_agent(lab.name, "n3")
        await corral_lab.power_on(lab.name, "n3", wait_ready=True)
    await until(n3_ready_at(controller_version()), 30)
