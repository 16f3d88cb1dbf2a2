"""What the fleet does with an HA container that keeps stopping unasked: a pure decision.

Its own host restarts it first (the agent, while it holds its lease), at most
`max_restart` times in `restart_window` seconds, and reports how many restarts it
made. Stopped again past that, the fleet moves it to another node (a relocation),
at most `max_relocate` times; after that it is marked failed and waits for the
operator (as Proxmox VE's max_restart, max_relocate and error state).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from corral.model import Container, ContainerState, DesiredState


@dataclass(frozen=True)
class RecoveryPolicy:
    max_restart: int = 1
    max_relocate: int = 1
    restart_window: float = 600.0


class RecoveryKind(enum.Enum):
    NOTHING = "nothing"
    RELOCATE = "relocate"
    FAIL = "fail"


@dataclass(frozen=True)
class Recovery:
    kind: RecoveryKind
    reason: str = ""


def keeps_running(record: Container) -> bool:
    """Whether its host should start it again when it stops unasked."""
    return record.ha and record.desired_state == DesiredState.RUNNING and not record.in_doubt and not record.ha_failed


def recovery_for(record: Container, reported: Container, policy: RecoveryPolicy) -> Recovery:
    """`record`: the fleet's; `reported`: what its node just said of it (state, restarts)."""
    if not keeps_running(record) or reported.state != ContainerState.STOPPED:
        return Recovery(RecoveryKind.NOTHING)
    if reported.ha_restarts < policy.max_restart:
        return Recovery(RecoveryKind.NOTHING, f"{record.node} restarts it ({reported.ha_restarts} of "
                                              f"{policy.max_restart} restarts made)")  # fmt: skip
    restarted = (f"it stopped unasked on {record.node} after {reported.ha_restarts} restart(s) there within "
                 f"{policy.restart_window:g}s")  # fmt: skip
    if record.ha_relocations < policy.max_relocate:
        return Recovery(RecoveryKind.RELOCATE, f"{restarted}: relocation {record.ha_relocations + 1} of "
                                               f"{policy.max_relocate}")  # fmt: skip
    return Recovery(RecoveryKind.FAIL, f"{restarted}, and {record.ha_relocations} relocation(s) did not keep it "
                                       "running; `corral ct start` tries again")  # fmt: skip
