"""The version-skew rule (corral/compat.py) and the controller's gate on RegisterNode."""

from __future__ import annotations

import pytest

from corral.compat import agent_compatibility, parse


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
