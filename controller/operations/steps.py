"""The names of operations and of their steps: the keys recovery decides on, so typed."""

from __future__ import annotations

import enum


class OpKind(enum.StrEnum):
    CREATE = "create"
    DESTROY = "destroy"
    MIGRATE = "migrate"
    FAILOVER = "failover"
    REMOVE_STALE_COPY = "remove-stale-copy"
    EVACUATE = "evacuate"
    REBALANCE = "rebalance"


class StepName(enum.StrEnum):
    # create
    CREATE_ON_NODE = "create-on-node"
    START = "start"
    UNDO_CREATE = "undo-create"
    # destroy
    DESTROY_ON_NODE = "destroy-on-node"
    # create and destroy: the record goes
    DELETE_RECORD = "delete-record"
    # migrate, forward
    PREFLIGHT = "preflight"
    OPEN_CHANNEL = "open-channel"
    PRECOPY_ROOTFS = "precopy-rootfs"
    PRECOPY_MEMORY = "precopy-memory"
    CHECKPOINT = "checkpoint"
    LAZY_CHECKPOINT = "lazy-checkpoint"
    STOP_SOURCE = "stop-source"
    DETACH_SOURCE = "detach-source"
    FINAL_TRANSFER = "final-transfer"
    ADOPT = "adopt"
    RESTORE = "restore"
    START_TARGET = "start-target"
    LAZY_RESTORE = "lazy-restore"
    SWITCH = "switch"  # the record now says the target: the point of no return
    WAIT_PAGES = "wait-pages"
    RELEASE_SOURCE = "release-source"
    CLOSE_CHANNEL = "close-channel"
    # migrate, back
    UNDO_ADOPT = "undo-adopt"
    REATTACH_SOURCE = "reattach-source"
    RESUME_SOURCE = "resume-source"
    UNDO_CHANNEL = "undo-channel"
    MARK_IN_DOUBT = "mark-in-doubt"
    # failover
    TAKEOVER = "takeover"  # the target takes the volume over from the lost node, at a newer generation
    # evacuate, rebalance: one step per container moved (move_step)
    MOVE = "move"
    # remove a stale copy
    RELEASE_STALE = "release-stale"
    # migrate from a kept checkpoint
    STOP_TARGET = "stop-target"
    RESTORE_KEPT = "restore-kept"
    RELEASE_TARGET = "release-target"


# Steps after which the target may run its copy (rule 1: proven gone before the source runs again).
TARGET_MAY_RUN = (StepName.RESTORE, StepName.START_TARGET, StepName.LAZY_RESTORE)


def move_step(container: str) -> str:
    """The step of an evacuation or rebalance that moves `container` (one per container)."""
    return f"{StepName.MOVE}:{container}"
