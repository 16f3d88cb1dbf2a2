"""The simulated hosts (agent/simulated.py, for scale tests) against a real controller: they
register, show as ready nodes in `corral node ls`, and go suspect once the simulator stops.
No lab: the controller, its CA and the hosts' certificates are made by bench/heartbeats.py's
helpers in a temporary directory; every process started here is stopped here."""

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.heartbeats import Processes, make_fleet, read_status, start_controller, start_hosts  # noqa: E402

HOSTS = 20


def node_states(cli: Path) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "controller.cli.main", "--config", str(cli), "--output", "json",
                          "node", "ls"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    return {n["name"]: n["state"] for n in json.loads(out.stdout)}


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        if (got := check()) or time.monotonic() > deadline:
            assert got, what
            return got
        time.sleep(0.5)


def test_simulated_hosts_are_ready_nodes_then_suspect_when_stopped(tmp_path):
    fleet = make_fleet(tmp_path, HOSTS, containers=2, heartbeat_timeout=2.0)
    procs = Processes()
    try:
        controller = start_controller(procs, fleet)
        (hosts, status), = start_hosts(procs, fleet, HOSTS, 1, containers=2)
        wait_for(lambda: read_status(status).get("registered") == HOSTS, 60, "every simulated host registered")
        all_ready = lambda s: s if len(s) == HOSTS and set(s.values()) == {"ready"} else None  # noqa: E731
        states = wait_for(lambda: all_ready(node_states(fleet["cli"])), 30, f"{HOSTS} ready nodes")
        assert sorted(states) == [f"sim{i:04d}" for i in range(HOSTS)]
        time.sleep(2)  # some heartbeats, with the containers they report
        assert read_status(status)["calls"] > 2 * HOSTS
        procs.stop(hosts)
        wait_for(lambda: set(node_states(fleet["cli"]).values()) <= {"suspect", "dead"}, 30,
                 "every node suspect once its heartbeats stop")  # fmt: skip
        assert controller.poll() is None
    finally:
        procs.close()
    assert all(p.poll() is not None for p in procs.procs)
