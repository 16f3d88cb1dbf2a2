"""Durable operations: long actions recorded step by step, watchable, resumable."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from controller.agents import AgentPool
    from controller.health.registry import NodeRegistry
    from controller.operations.engine import PlanFactory
    from controller.store.base import Store


def operation_plans(store: "Store", nodes: "NodeRegistry", agents: "AgentPool") -> dict[str, "PlanFactory"]:
    """Each operation kind and the plan that carries it out."""
    from controller.operations.failover import FailoverPlan
    from controller.operations.lifecycle import CreatePlan, DestroyPlan
    from controller.operations.migrate import MigrationPlan
    from controller.operations.reach import Reach
    from controller.operations.stale_copy import StaleCopyPlan
    from controller.operations.steps import OpKind

    reach = Reach(nodes, agents)
    return {
        OpKind.CREATE: lambda op: CreatePlan(op, store, reach),
        OpKind.DESTROY: lambda op: DestroyPlan(op, store, reach),
        OpKind.MIGRATE: lambda op: MigrationPlan(op, store, nodes, agents),
        OpKind.FAILOVER: lambda op: FailoverPlan(op, store, reach, nodes.why_not_lost),
        OpKind.REMOVE_STALE_COPY: lambda op: StaleCopyPlan(op, store, reach),
    }
