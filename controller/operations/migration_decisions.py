"""What a migration does next after a failure or a controller restart, decided.

Pure functions of the operation's recorded steps and params and of a fresh read
of the record (where it says the container lives): no agent calls, no store.
MigrationPlan carries the verdicts out. The rules (DESIGN rules 1 and 2):
- once the record names the target (switch), or a post-copy target has resumed,
  only forward;
- before that, back to the source, and the source runs again only once the
  target's copy is proven gone when the target may have run it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from controller.model import Operation
from controller.operations.params import MigrateParams, Strategy
from controller.operations.steps import TARGET_MAY_RUN, StepName

POST_COPY = Strategy.POST_COPY


class Next(enum.Enum):
    FINISH_FROM_CHECKPOINT = "finish-from-checkpoint"  # the kept checkpoint runs again: record it there
    NOTHING_CHANGED = "nothing-changed"  # from a checkpoint, stopped before its restore: nothing to undo
    POSTCOPY_TAIL = "postcopy-tail"  # the target runs it on partial memory: switch, wait for the pages
    FINISH_FORWARD = "finish-forward"  # switch if not yet, then remove the source's copy
    LEAVE = "leave"  # a post-copy page transfer failed and was dealt with: the source keeps a checkpoint
    ASK_TARGET = "ask-target"  # after a restart: whether the target runs it decides
    ROLL_BACK = "roll-back"


class Resume(enum.Enum):
    NONE = "none"  # it was not running
    FROM_KEPT = "from-kept"  # post-copy source: thaw it, or restore the checkpoint it kept
    RESTORE_OR_START = "restore-or-start"  # live: its own checkpoint, else a fresh start
    START = "start"


@dataclass(frozen=True)
class RollbackPlan:
    prove_target_gone: bool  # release the target's copy; failing that, the container is in doubt
    tidy_target_before_reattach: bool  # shared volume: the target lets go before the source attaches
    reattach_source: bool  # shared volume: back to the source at the next generation
    resume: Resume
    tidy_target: bool  # the target never ran it: removing its copy is tidiness, not safety
    discard_channel: bool


def _params(op: Operation) -> MigrateParams:
    return MigrateParams.of(op.params)


def past_postcopy_return(op: Operation) -> bool:
    """Post-copy's point of no return: the target has resumed the container."""
    return _params(op).strategy == POST_COPY and op.done(StepName.LAZY_RESTORE)


def after_failure(op: Operation, record_node: str) -> Next:
    """A step failed (or the operation was cancelled): what now."""
    params = _params(op)
    if params.from_checkpoint:
        if op.done(StepName.RESTORE_KEPT):
            return Next.FINISH_FROM_CHECKPOINT
        # Its restore failed, or only its reply was lost: the checkpoint's host says.
        return Next.ASK_TARGET if op.step(StepName.RESTORE_KEPT) is not None else Next.NOTHING_CHANGED
    if past_postcopy_return(op):
        if op.step(StepName.WAIT_PAGES) is None:
            return Next.POSTCOPY_TAIL  # failed before the pages were waited for: go on
        if op.done(StepName.WAIT_PAGES):
            return Next.FINISH_FORWARD  # every page moved: only the cleanup failed
        return Next.LEAVE
    if op.done(StepName.SWITCH) or record_node == params.target:
        return Next.FINISH_FORWARD
    return Next.ROLL_BACK


def after_restart(op: Operation, record_node: str) -> Next:
    """The controller restarted mid-operation: what now, before asking any host."""
    params = _params(op)
    switched = record_node == params.target
    if params.from_checkpoint:
        if switched or op.done(StepName.RESTORE_KEPT):
            return Next.FINISH_FROM_CHECKPOINT
        # Begun but its end not recorded: the checkpoint may run again already (recovery harness,
        # from-checkpoint, write 8): its host says.
        return Next.ASK_TARGET if op.step(StepName.RESTORE_KEPT) is not None else Next.NOTHING_CHANGED
    if past_postcopy_return(op):
        return Next.POSTCOPY_TAIL
    if switched:
        return Next.FINISH_FORWARD  # the record names the target: never release its copy
    if any(op.step(s) is not None for s in TARGET_MAY_RUN):
        return Next.ASK_TARGET
    return Next.ROLL_BACK


def after_target_answer(op: Operation, target_runs_it: bool) -> Next:
    """After a restart, the target said whether it runs the container."""
    if _params(op).from_checkpoint:  # the target: where the checkpoint was kept
        return Next.FINISH_FROM_CHECKPOINT if target_runs_it else Next.NOTHING_CHANGED
    if not target_runs_it:
        return Next.ROLL_BACK
    return Next.POSTCOPY_TAIL if _params(op).strategy == POST_COPY else Next.FINISH_FORWARD


def rollback_plan(op: Operation) -> RollbackPlan:
    """How to put the container back on its source, from the steps that were started."""
    params = _params(op)
    started = lambda name: op.step(name) is not None  # noqa: E731
    target_may_run = any(started(s) for s in TARGET_MAY_RUN)
    shared = started(StepName.DETACH_SOURCE)
    adopted = started(StepName.ADOPT)
    if not params.was_running:
        resume = Resume.NONE
    elif started(StepName.LAZY_CHECKPOINT):
        resume = Resume.FROM_KEPT
    elif started(StepName.CHECKPOINT):
        resume = Resume.RESTORE_OR_START
    else:
        resume = Resume.START
    return RollbackPlan(
        prove_target_gone=target_may_run,
        tidy_target_before_reattach=shared and adopted and not target_may_run,
        reattach_source=shared,
        resume=resume,
        tidy_target=adopted and not target_may_run,
        discard_channel=started(StepName.OPEN_CHANNEL),
    )
