"""What an operation is: its identity, state, steps, progress and outcome."""

from __future__ import annotations

import enum
import json
import secrets
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any


class OpState(enum.Enum):
    PENDING = "pending"  # queued behind another operation on the same container
    RUNNING = "running"
    ROLLING_BACK = "rolling-back"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # failed and rolled back: the container is as it was
    CANCELLED = "cancelled"  # cancelled and rolled back

    @property
    def finished(self) -> bool:
        return self in (OpState.SUCCEEDED, OpState.FAILED, OpState.CANCELLED)


class StepState(enum.Enum):
    STARTED = "started"
    DONE = "done"
    FAILED = "failed"
    UNDONE = "undone"


@dataclass(frozen=True)
class Step:
    name: str
    state: StepState
    started_at: float
    finished_at: float = 0.0
    detail: str = ""

    @property
    def duration_ms(self) -> float:
        return (self.finished_at - self.started_at) * 1000 if self.finished_at else 0.0


@dataclass(frozen=True)
class Progress:
    phase: str = ""
    bytes_done: int = 0
    bytes_total: int = 0
    rate_bps: float = 0.0
    eta_s: float = -1.0
    message: str = ""


@dataclass(frozen=True)
class Operation:
    id: str
    kind: str
    container: str
    params: dict[str, Any]
    state: OpState = OpState.PENDING
    steps: tuple[Step, ...] = ()
    progress: Progress = field(default_factory=Progress)
    # Named measurements in milliseconds (per phase, downtime, CRIU's frozen time...).
    timings: dict[str, float] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    cancel_requested: bool = False
    created_at: float = 0.0
    updated_at: float = 0.0
    # Raised at every change; the store never replaces a newer revision with an older one.
    revision: int = 0

    @staticmethod
    def new(kind: str, container: str, params: dict[str, Any]) -> "Operation":
        now = time.time()
        return Operation(
            id=f"{kind[:3]}-{time.strftime('%Y%m%d%H%M%S', time.gmtime(now))}-{secrets.token_hex(3)}",
            kind=kind, container=container, params=params, created_at=now, updated_at=now,
        )  # fmt: skip

    def step(self, name: str) -> Step | None:
        for s in reversed(self.steps):
            if s.name == name:
                return s
        return None

    def done(self, name: str) -> bool:
        s = self.step(name)
        return s is not None and s.state == StepState.DONE

    def with_step(self, step: Step) -> "Operation":
        steps = [s for s in self.steps if s.name != step.name] + [step]
        return replace(self, steps=tuple(steps), updated_at=time.time())

    def changed(self, **changes: Any) -> "Operation":
        """This operation with `changes`, at the next revision."""
        return replace(self, **changes, revision=self.revision + 1, updated_at=time.time())

    def to_json(self) -> str:
        data = asdict(self)
        data["state"] = self.state.value
        data["steps"] = [{**asdict(s), "state": s.state.value} for s in self.steps]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Operation":
        data = json.loads(text)
        data["state"] = OpState(data["state"])
        data["steps"] = tuple(Step(**{**s, "state": StepState(s["state"])}) for s in data["steps"])
        data["progress"] = Progress(**data["progress"])
        return cls(**data)
