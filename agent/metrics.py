"""The agent's Prometheus metrics (`metrics_listen`, README, Observing): the node's capacity and
use, its containers by state, each container's usage and limit-hit counters (the numbers of
`corral ct stats`, labelled by container), and the heartbeat's round trip to the controller."""

from __future__ import annotations

from collections import Counter

from prometheus_client import Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.containers import ContainerManager
from agent.host_facts import HostFacts
from corral.model import ContainerState

HEARTBEAT_SECONDS = Histogram(
    "corral_agent_heartbeat_seconds", "Round trip of a heartbeat to the controller, until its reply",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)  # fmt: skip

# (metric, help, ContainerStats field, scale to the metric's unit); gauges, then counters.
_GAUGES = (
    ("corral_container_cpu_limit_cpus", "CPU quota in CPUs (0 = not limited)", "cpu_limit_millis", 1e-3),
    ("corral_container_memory_bytes", "Memory in use", "memory_bytes", 1),
    ("corral_container_memory_limit_bytes", "Memory limit in force (0 = not limited)", "memory_limit_bytes", 1),
    ("corral_container_pids", "Processes (tasks) in the container", "pids", 1),
    ("corral_container_pids_limit", "Process limit in force (0 = not limited)", "pids_limit", 1),
    ("corral_container_disk_used_bytes", "Root filesystem usage (the storage driver's measure)", "disk_used_bytes", 1),
    ("corral_container_disk_limit_bytes", "Root filesystem size limit (0 = none)", "disk_limit_bytes", 1),
)
_COUNTERS = (
    ("corral_container_cpu_usage_seconds", "CPU time used since the container started", "cpu_usage_usec", 1e-6),
    ("corral_container_cpu_throttled_periods", "Periods held back by the CPU quota", "cpu_throttled_count", 1),
    ("corral_container_cpu_throttled_seconds", "Time held back by the CPU quota", "cpu_throttled_usec", 1e-6),
    ("corral_container_pids_max_events", "Forks refused at the process limit", "pids_max_events", 1),
)
_MEMORY_EVENTS = (("high", "memory_high_events"), ("max", "memory_max_events"), ("oom", "memory_oom_events"),
                  ("oom_kill", "memory_oom_kill_events"))  # fmt: skip


class AgentMetrics:
    """What a scrape of the agent measures, on the agent's event loop (corral.metrics)."""

    def __init__(self, node: str, facts: HostFacts, containers: ContainerManager) -> None:
        self.node = node
        self.facts = facts
        self.containers = containers

    async def gather(self) -> list[Metric]:
        facts = self.facts.current()
        stats = await self.containers.stats()
        node = [self.node]
        out: list[Metric] = []
        for name, help_text, value in (
            ("corral_node_cpus", "CPUs of the host", facts.cpus),
            ("corral_node_memory_bytes", "Memory of the host", facts.memory_bytes),
            ("corral_node_memory_available_bytes", "Memory available on the host", facts.memory_available_bytes),
            ("corral_node_disk_bytes", "Size of the containers' storage", facts.disk_bytes),
            ("corral_node_disk_free_bytes", "Free space of the containers' storage", facts.disk_free_bytes),
        ):
            out.append(GaugeMetricFamily(name, help_text, labels=["node"]))
            out[-1].add_metric(node, value)
        by_state = Counter(s.state for s in stats)
        states = GaugeMetricFamily("corral_node_containers", "Containers of this host by state",
                                   labels=["node", "state"])  # fmt: skip
        for state in (ContainerState.RUNNING, ContainerState.STOPPED, ContainerState.FROZEN):
            states.add_metric([self.node, state.value], by_state.pop(state, 0))
        for state, count in by_state.items():
            states.add_metric([self.node, state.value], count)
        out.append(states)
        labels = ["node", "container"]
        for family, specs in ((GaugeMetricFamily, _GAUGES), (CounterMetricFamily, _COUNTERS)):
            for name, help_text, field, scale in specs:
                metric = family(name, help_text, labels=labels)
                for s in stats:
                    metric.add_metric([self.node, s.name], getattr(s, field) * scale)
                out.append(metric)
        events = CounterMetricFamily("corral_container_memory_events", "Times memory reached memory.high (high), "
                                     "its limit (max; cgroup v1: the fail count), the OOM killer ran (oom) and killed "
                                     "(oom_kill)", labels=[*labels, "event"])  # fmt: skip
        for s in stats:
            for event, field in _MEMORY_EVENTS:
                events.add_metric([self.node, s.name, event], getattr(s, field))
        out.append(events)
        return out
