"""Benchmark: the scheduler alone (pure functions, no hosts).

Places N containers one after another onto M simulated nodes (random sizes, labels in
three zones; a fifth of the containers with a zone constraint, a tenth in one of 50
anti-affinity groups), each decision seeing the allocations the earlier ones made,
then plans the evacuation of a node holding 100 containers and a rebalance.

    python bench/scheduler.py [--nodes 1000] [--containers 20000] [--seed 1] [--json]

Prints decisions per second, p50/p99 per decision, the evacuation and rebalance
planning times. Results depend on this machine's CPU; the README has the figures.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.scheduler.maintenance import plan_evacuation, plan_rebalance  # noqa: E402
from controller.scheduler.placement import PlacementPolicy, PlacementRequest, Snapshot, decide  # noqa: E402
from corral.errors import NoCapacity  # noqa: E402
from corral.labels import Constraint  # noqa: E402
from corral.model import Container, ContainerState, Limits, Node, NodeFacts, NodeState  # noqa: E402

GB, MB = 1 << 30, 1 << 20


def fleet(n: int, rng: random.Random) -> list[Node]:
    return [Node(NodeFacts(f"h{i:04d}", f"10.0.{i // 250}.{i % 250}:7701", cpus=rng.choice([8, 16, 32, 64]),
                           memory_bytes=rng.choice([32, 64, 128, 256]) * GB, disk_free_bytes=2000 * GB,
                           storage_drivers=("dir", "image"), live_strategies=("pre-copy",),
                           labels={"zone": "abc"[i % 3]}), NodeState.READY, 0.0)
            for i in range(n)]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--containers", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    policy = PlacementPolicy()
    nodes = {n.name: n for n in fleet(args.nodes, rng)}
    groups: dict[str, set[str]] = {}
    placed: list[Container] = []
    times, refused = [], 0
    began = time.perf_counter()
    for i in range(args.containers):
        limits = Limits(memory_bytes=rng.choice([256, 512, 1024, 2048, 4096]) * MB, cpu_millis=rng.choice([250, 500, 1000, 2000]))
        constraints = (Constraint("zone", "abc"[i % 3]),) if i % 5 == 0 else ()
        group = f"g{i % 50}" if i % 10 == 0 else ""
        request = PlacementRequest(f"c{i}", limits, "", "dir", constraints, group)
        t0 = time.perf_counter()
        try:
            chosen = decide(request, list(nodes.values()), policy,
                            Snapshot({n: frozenset(g) for n, g in groups.items()}))  # fmt: skip
        except NoCapacity:
            refused += 1
            continue
        finally:
            times.append(time.perf_counter() - t0)
        node = nodes[chosen.node]
        nodes[chosen.node] = replace(node, allocated=node.allocated + limits, container_count=node.container_count + 1)
        if group:
            groups.setdefault(chosen.node, set()).add(group)
        placed.append(Container(f"c{i}", chosen.node, "busybox", ContainerState.RUNNING, limits=limits, group=group))
    total = time.perf_counter() - began

    # A host with 100 containers, evacuated; then a rebalance of the whole fleet.
    busiest = max(nodes.values(), key=lambda n: n.container_count)
    extra = [Container(f"x{i}", busiest.name, "busybox", ContainerState.RUNNING, limits=Limits(memory_bytes=256 * MB))
             for i in range(max(0, 100 - busiest.container_count))]  # fmt: skip
    everything = placed + extra
    on_it = sum(1 for c in everything if c.node == busiest.name)
    t0 = time.perf_counter()
    evacuation = plan_evacuation(busiest.name, list(nodes.values()), everything, policy, allow_cold=False)
    evacuate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rebalance = plan_rebalance(list(nodes.values()), everything, policy)
    rebalance_s = time.perf_counter() - t0

    result = {
        "nodes": args.nodes, "containers": args.containers, "placed": len(placed), "refused": refused,
        "decisions_per_s": round(len(times) / total, 1),
        "decision_ms_p50": round(statistics.median(times) * 1000, 3),
        "decision_ms_p99": round(sorted(times)[int(len(times) * 0.99) - 1] * 1000, 3),
        "evacuation": {"containers": on_it, "moves": len(evacuation.moves), "stuck": len(evacuation.stuck),
                       "plan_ms": round(evacuate_s * 1000, 1)},
        "rebalance": {"moves": len(rebalance.moves), "plan_ms": round(rebalance_s * 1000, 1)},
    }  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"placement: {result['placed']} of {args.containers} containers onto {args.nodes} nodes "
              f"({refused} refused: full), {result['decisions_per_s']} decisions/s, "
              f"p50 {result['decision_ms_p50']} ms, p99 {result['decision_ms_p99']} ms")
        print(f"evacuation plan of a host with {on_it} containers: {result['evacuation']['plan_ms']} ms "
              f"({len(evacuation.moves)} moves, {len(evacuation.stuck)} stay)")
        print(f"rebalance plan of the fleet: {result['rebalance']['plan_ms']} ms ({len(rebalance.moves)} moves)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
