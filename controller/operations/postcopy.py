"""Post-copy's last phase, decided: did every page move, and if not, what is left where.

Once the target has resumed the container (the "lazy-restore" step), its memory is
split between the hosts: what it touched is on the target, the rest is still served
by the source, which is frozen. That is post-copy's point of no return: the source
can no longer simply run on (the target has run, and may have said things to the
world the source never said), so a failure from then on is not rolled back. The
target's copy dies (its memory is incomplete); the source keeps the container, as it
was at the freeze, as a checkpoint on disk; the operator chooses whether to run it
from there. These are pure functions of what the two agents reported.
"""

from __future__ import annotations

from dataclasses import dataclass

from corral.v1 import agent_pb2 as apb

DONE = "done"
FAILED = "failed"
UNKNOWN = "unknown"  # the agent has no post-copy of the operation (it restarted)
UNREACHABLE = "unreachable"
MOVING = "moving"  # still moving when we stopped waiting

_STATES = {apb.PAGES_STATE_DONE: DONE, apb.PAGES_STATE_FAILED: FAILED, apb.PAGES_STATE_UNKNOWN: UNKNOWN,
           apb.PAGES_STATE_MOVING: MOVING}  # fmt: skip


@dataclass(frozen=True)
class SideReport:
    """What one agent said about the page transfer (or that it could not be asked)."""

    state: str
    detail: str = ""
    kept_checkpoint: str = ""  # source: a complete checkpoint it kept, on its host
    pages_done_at: float = 0.0

    @classmethod
    def of(cls, update: apb.PagesUpdate) -> SideReport:
        return cls(_STATES.get(update.state, UNKNOWN), update.detail, update.kept_checkpoint, update.pages_done_at)


def pages_moved(target: SideReport, source: SideReport, target_running: bool | None) -> bool:
    """Every page reached the target: its puller says so, or the source served them all (CRIU's
    page server ends well only once the puller has said it has everything) and the target
    still runs the container."""
    return target.state == DONE or (source.state == DONE and target.state != FAILED and target_running is True)


def target_gone(target: SideReport, target_running: bool | None) -> bool:
    """The target's copy is proven not to run: its agent killed it after a failed transfer,
    or says it is not running."""
    return target.state == FAILED or target_running is False


def failure_message(name: str, op_id: str, source_node: str, target_node: str, target: SideReport,
                    source: SideReport, gone: bool) -> str:  # fmt: skip
    """What the operator must know after post-copy failed past its point of no return."""
    why = target.detail if target.state == FAILED and target.detail else source.detail
    if not why:
        why = {UNREACHABLE: f"{target_node} could not be reached", UNKNOWN: f"the agent on {target_node} restarted"}.get(
            target.state, f"the transfer ended without its last pages (target {target.state}, source {source.state})"
        )  # fmt: skip
    parts = [f"post-copy of {name} failed after it had resumed on {target_node}: {why}"]
    if gone:
        parts.append("it is not running anywhere")
    else:
        parts.append(f"{target_node} cannot be reached, so its copy may still be running there, waiting for "
                     "memory that will not come")  # fmt: skip
    if source.kept_checkpoint:
        parts.append(f"{source_node} kept the container as it was at the freeze, in {source.kept_checkpoint} "
                     f"(what it did on {target_node} since then is lost)")  # fmt: skip
        command = f"corral ct migrate {name} --to {source_node} --from-checkpoint {op_id}"
        parts.append(f"to run it from there: {command}" if gone
                     else f"only once {target_node} is known to be down, run it from there: {command}")  # fmt: skip
    else:
        state = source.detail or f"source {source.state}"
        parts.append(f"no checkpoint of it is left on {source_node} ({state}): its memory is lost; its disk on "
                     f"{target_node} is intact, `corral ct start {name}` boots it afresh")  # fmt: skip
    return "; ".join(parts)
