"""What a migration does next after a failure or a restart, decided alone: no agents, no store.

Each case is a migration that got so far (steps started or done), a fresh read of where
the record says the container lives, and the verdict the rules require."""

import time

import pytest

from controller.model import Operation, Step, StepState
from controller.operations.migration_decisions import (
    Next,
    Resume,
    after_failure,
    after_restart,
    after_target_answer,
    rollback_plan,
)
from controller.operations.steps import StepName as S

DONE, STARTED = StepState.DONE, StepState.STARTED


def migration(strategy="cold", done=(), started=(), **params) -> Operation:
    now = time.time()
    steps = tuple(Step(s, DONE, now, now) for s in done) + tuple(Step(s, STARTED, now) for s in started)
    base = {"source": "n1", "target": "n2", "strategy": strategy, "live": strategy != "cold", "was_running": True}
    return Operation("mig-1", "migrate", "web", {**base, **params}, steps=steps)


COLD_TO_START = (S.OPEN_CHANNEL, S.PRECOPY_ROOTFS, S.STOP_SOURCE, S.FINAL_TRANSFER, S.ADOPT)
LIVE_TO_RESTORE = (S.PREFLIGHT, S.OPEN_CHANNEL, S.PRECOPY_ROOTFS, S.CHECKPOINT, S.ADOPT)
POSTCOPY_TO_LAZY = (S.PREFLIGHT, S.OPEN_CHANNEL, S.PRECOPY_ROOTFS, S.LAZY_CHECKPOINT, S.ADOPT)


@pytest.mark.parametrize("op, record_node, verdict", [
    pytest.param(migration(done=COLD_TO_START, started=(S.START_TARGET,)), "n1", Next.ROLL_BACK, id="cold-before-switch"),
    pytest.param(migration(done=(*COLD_TO_START, S.START_TARGET), started=(S.SWITCH,)), "n2", Next.FINISH_FORWARD,
                 id="review-H3-switch-committed-step-not"),
    pytest.param(migration(done=(*COLD_TO_START, S.START_TARGET, S.SWITCH), started=(S.RELEASE_SOURCE,)), "n2",
                 Next.FINISH_FORWARD, id="cold-after-switch"),
    pytest.param(migration("post-copy", done=(*POSTCOPY_TO_LAZY, S.LAZY_RESTORE)), "n1", Next.POSTCOPY_TAIL,
                 id="postcopy-resumed-not-switched"),
    pytest.param(migration("post-copy", done=(*POSTCOPY_TO_LAZY, S.LAZY_RESTORE, S.SWITCH, S.WAIT_PAGES)), "n2",
                 Next.FINISH_FORWARD, id="postcopy-pages-moved-cleanup-failed"),
    pytest.param(migration("post-copy", done=(*POSTCOPY_TO_LAZY, S.LAZY_RESTORE, S.SWITCH),
                           started=(S.WAIT_PAGES,)), "n2", Next.LEAVE, id="postcopy-pages-failed"),
    pytest.param(migration("post-copy", done=POSTCOPY_TO_LAZY, started=(S.LAZY_RESTORE,)), "n1", Next.ROLL_BACK,
                 id="postcopy-before-resume"),
    pytest.param(migration("from-checkpoint", done=(S.STOP_TARGET,), from_checkpoint="mig-0"), "n1",
                 Next.NOTHING_CHANGED, id="from-checkpoint-before-restore"),
    pytest.param(migration("from-checkpoint", done=(S.STOP_TARGET, S.RESTORE_KEPT), from_checkpoint="mig-0"), "n1",
                 Next.FINISH_FROM_CHECKPOINT, id="from-checkpoint-restored"),
    pytest.param(migration("from-checkpoint", done=(S.STOP_TARGET,), started=(S.RESTORE_KEPT,),
                           from_checkpoint="mig-0"), "n1", Next.ASK_TARGET, id="from-checkpoint-restore-reply-lost"),
])  # fmt: skip
def test_after_a_failure(op, record_node, verdict):
    assert after_failure(op, record_node) == verdict


@pytest.mark.parametrize("op, record_node, verdict", [
    pytest.param(migration(done=COLD_TO_START[:2], started=(S.STOP_SOURCE,)), "n1", Next.ROLL_BACK,
                 id="cold-target-never-ran"),
    pytest.param(migration("stop-and-copy", done=LIVE_TO_RESTORE, started=(S.RESTORE,)), "n1", Next.ASK_TARGET,
                 id="live-restore-may-have-run"),
    pytest.param(migration(done=(*COLD_TO_START, S.START_TARGET), started=(S.SWITCH,)), "n2", Next.FINISH_FORWARD,
                 id="review-H3-fresh-record-decides"),
    pytest.param(migration("post-copy", done=(*POSTCOPY_TO_LAZY, S.LAZY_RESTORE)), "n1", Next.POSTCOPY_TAIL,
                 id="postcopy-resumed"),
    pytest.param(migration("from-checkpoint", done=(S.STOP_TARGET,), started=(S.SWITCH,), from_checkpoint="mig-0"),
                 "n2", Next.FINISH_FROM_CHECKPOINT, id="from-checkpoint-switched"),
])  # fmt: skip
def test_after_a_restart(op, record_node, verdict):
    assert after_restart(op, record_node) == verdict


def test_after_a_restart_the_targets_answer_decides():
    live = migration("stop-and-copy", done=LIVE_TO_RESTORE, started=(S.RESTORE,))
    assert after_target_answer(live, target_runs_it=True) == Next.FINISH_FORWARD
    assert after_target_answer(live, target_runs_it=False) == Next.ROLL_BACK
    lazy = migration("post-copy", done=POSTCOPY_TO_LAZY, started=(S.LAZY_RESTORE,))
    assert after_target_answer(lazy, target_runs_it=True) == Next.POSTCOPY_TAIL


def test_rollback_proves_the_target_gone_whenever_it_may_have_run():
    for may_run in (S.RESTORE, S.START_TARGET, S.LAZY_RESTORE):
        plan = rollback_plan(migration("stop-and-copy", done=LIVE_TO_RESTORE, started=(may_run,)))
        assert plan.prove_target_gone and not plan.tidy_target, may_run
    plan = rollback_plan(migration(done=COLD_TO_START[:4], started=(S.ADOPT,)))
    assert not plan.prove_target_gone and plan.tidy_target and plan.discard_channel


def test_rollback_resumes_the_source_the_way_it_was_stopped():
    assert rollback_plan(migration(done=COLD_TO_START)).resume == Resume.START
    assert rollback_plan(migration(done=COLD_TO_START, was_running=False)).resume == Resume.NONE
    assert rollback_plan(migration("stop-and-copy", done=LIVE_TO_RESTORE)).resume == Resume.RESTORE_OR_START
    assert rollback_plan(migration("post-copy", done=POSTCOPY_TO_LAZY)).resume == Resume.FROM_KEPT


def test_rollback_of_a_shared_volume_hands_it_back_after_the_target_lets_go():
    plan = rollback_plan(migration(done=(S.STOP_SOURCE, S.DETACH_SOURCE, S.ADOPT)))
    assert plan.tidy_target_before_reattach and plan.reattach_source and not plan.prove_target_gone
    plan = rollback_plan(migration(done=(S.STOP_SOURCE,), started=(S.DETACH_SOURCE,)))
    assert plan.reattach_source and not plan.tidy_target_before_reattach and not plan.discard_channel
