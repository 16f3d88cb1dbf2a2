"""How long a node may be silent before it is suspect, then dead: a pure decision.

An agent's lease runs `lease` seconds from each heartbeat the controller
acknowledges; the agent gives it up earlier by its own margin. A silent node is
*suspect* after `suspect_after` (maybe a partition, maybe a blip: nothing moves),
and *dead* only once its lease has surely expired, plus `margin` for clock drift
and scheduling delay (DESIGN: the grantor reuses a lease only after expiry plus a
margin). Monotonic seconds only.
"""

from __future__ import annotations

from dataclasses import dataclass

from corral.model import NodeState


@dataclass(frozen=True)
class HealthPolicy:
    suspect_after: float = 5.0
    lease: float = 5.0
    margin: float = 2.0

    @property
    def dead_after(self) -> float:
        return self.lease + self.margin


def assess(silent_for: float, policy: HealthPolicy) -> NodeState:
    """The state of a node last heard `silent_for` seconds ago."""
    if silent_for > policy.dead_after:
        return NodeState.DEAD
    if silent_for > policy.suspect_after:
        return NodeState.SUSPECT
    return NodeState.READY


def describe(state: NodeState, silent_for: float, policy: HealthPolicy) -> str:
    """What an operator reads in `corral node show`."""
    if state == NodeState.READY:
        return ""
    if state == NodeState.SUSPECT:
        left = max(0.0, policy.dead_after - silent_for)
        return (f"no heartbeat for {silent_for:.1f}s: a partition or a blip; nothing is moved off it "
                f"(dead in {left:.1f}s if it stays silent)")  # fmt: skip
    if state == NodeState.DEAD:
        return (f"no heartbeat for {silent_for:.1f}s: its lease ({policy.lease:g}s) has expired; its HA "
                "containers move only once it is fenced")  # fmt: skip
    if state == NodeState.FENCED:
        return "proven off: its HA containers may run elsewhere; it reports what it holds when it is back"
    return ""


def why_not_lost(name: str, state: NodeState, silent_for: float, policy: HealthPolicy) -> str | None:
    """None if node `name` is proven unable to run anything: fenced. A dead node is not enough on
    its own: a host whose agent died cannot fence itself, and its containers may still run."""
    if state == NodeState.FENCED:
        return None
    if state == NodeState.READY:
        return f"it is ready (heard {silent_for:.1f}s ago)"
    if state == NodeState.SUSPECT:
        return (f"it is suspect: silent for {silent_for:.1f}s, maybe only cut off; its lease and margin "
                f"run {policy.dead_after:g}s")  # fmt: skip
    return ("it is dead but not fenced: its agent may have died with its containers still running. "
            f"Power it off, then `corral node fenced {name}`")


def next_change(silent_for: float, policy: HealthPolicy) -> float | None:
    """Seconds until a node silent for `silent_for` turns suspect or dead if it stays silent
    (None: it is dead already). `assess` compares strictly: the change is due just after."""
    for threshold in (policy.suspect_after, policy.dead_after):
        if silent_for <= threshold:
            return threshold - silent_for
    return None
