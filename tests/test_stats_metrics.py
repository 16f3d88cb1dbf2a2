"""Container stats (`corral ct stats`, `corral top`) and the Prometheus /metrics of the controller
and the agents (issue 12: See what containers use; Observe): reading cgroup counters (v1 and
v2 files laid out in a temporary directory), the config keys, and in the lab: /metrics parses as
Prometheus text and its numbers match `ct stats`; a memory limit hit and an OOM kill are counted."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agent.runtime.cgroups import container_cgroups, read_counters
from corral.errors import CorralError

# -- cgroup counters, from files ---------------------------------------------------------------


def _write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def test_counters_of_cgroup_v2(tmp_path):
    d = _write(tmp_path / "lxc.payload.web1", {
        "cpu.stat": "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\nnr_periods 90\n"
                    "nr_throttled 7\nthrottled_usec 120000\n",
        "cpu.max": "50000 100000\n", "memory.current": "1048576\n", "memory.max": "33554432\n",
        "memory.events": "low 0\nhigh 2\nmax 31\noom 3\noom_kill 3\noom_group_kill 0\n",
        "pids.current": "4\n", "pids.max": "max\n", "pids.events": "max 5\n",
    })  # fmt: skip
    counters, missing = read_counters({"": d}, v1=False)
    assert missing == []
    assert counters == {
        "cpu_usage_usec": 2_500_000, "cpu_throttled_count": 7, "cpu_throttled_usec": 120_000, "cpu_limit_millis": 500,
        "memory_bytes": 1 << 20, "memory_limit_bytes": 32 << 20, "memory_high_events": 2, "memory_max_events": 31,
        "memory_oom_events": 3, "memory_oom_kill_events": 3, "pids": 4, "pids_limit": 0, "pids_max_events": 5,
    }  # fmt: skip


def test_counters_of_cgroup_v1_and_what_is_missing(tmp_path):
    memory = _write(tmp_path / "memory/lxc.payload.web1", {
        "memory.usage_in_bytes": "2097152\n", "memory.limit_in_bytes": "9223372036854771712\n",
        "memory.failcnt": "12\n", "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
    })  # fmt: skip
    cpu = _write(tmp_path / "cpu/lxc.payload.web1", {
        "cpu.stat": "nr_periods 10\nnr_throttled 4\nthrottled_time 3000000\n",
        "cpu.cfs_quota_us": "-1\n", "cpu.cfs_period_us": "100000\n",
    })  # fmt: skip
    cpuacct = _write(tmp_path / "cpuacct/lxc.payload.web1", {"cpuacct.usage": "7000000000\n"})
    counters, missing = read_counters({"memory": memory, "cpu": cpu, "cpuacct": cpuacct}, v1=True)
    assert counters["cpu_usage_usec"] == 7_000_000 and counters["cpu_throttled_usec"] == 3000
    assert counters["cpu_limit_millis"] == 0 and counters["memory_limit_bytes"] == 0  # unlimited
    assert counters["memory_max_events"] == 12 and counters["memory_oom_kill_events"] == 1
    assert counters["pids"] == 0 and set(missing) == {"pids.current", "pids.max", "pids.events"}


def test_the_container_cgroup_is_the_payload_one_above_init(tmp_path, monkeypatch):
    """Init may sit below the container's cgroup (systemd's init.scope): the counters are those of
    lxc.payload.NAME (with LXC's -N suffix), which hold every process of the container."""
    import agent.runtime.cgroups as cgroups

    mount = tmp_path / "unified"
    memberships = [(mount, "cgroup2", {"rw"}, "/lxc.payload.web1-1/init.scope"),
                   (tmp_path / "memory", "cgroup", {"rw", "memory"}, "/lxc.payload.web1-1")]  # fmt: skip
    monkeypatch.setattr(cgroups, "_memberships", lambda pid, mountinfo: memberships)
    assert container_cgroups(1) == {"": mount / "lxc.payload.web1-1", "memory": tmp_path / "memory/lxc.payload.web1-1"}


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("value, error", [
    ("127.0.0.1:7708", None), ("127.0.0.1", "HOST:PORT"), ("127.0.0.1:99999", "HOST:PORT"),
    ("127.0.0.1:7701", "gRPC address"),
])  # fmt: skip
def test_agent_metrics_listen_is_read_strictly(tmp_path, value, error):
    from agent.config import AgentConfig

    for name in ("ca.crt", "a.crt", "a.key"):
        (tmp_path / name).write_text("x")
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({"node": "n1", "listen": "127.0.0.1:7701", "controller": "127.0.0.1:7700",
                                    "tls": {"ca": "ca.crt", "cert": "a.crt", "key": "a.key"},
                                    "metrics_listen": value}))  # fmt: skip
    if error is None:
        assert AgentConfig.load(path).metrics_listen == value
    else:
        with pytest.raises(CorralError, match=error) as exc:
            AgentConfig.load(path)
        assert "metrics_listen" in exc.value.message


# -- in the lab --------------------------------------------------------------------------------


def scrape(address: str) -> dict[tuple[str, tuple], float]:
    """GET http://ADDRESS/metrics, parsed as Prometheus text: (sample name, labels) -> value."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=15) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def metrics_address(config: Path) -> str:
    return yaml.safe_load(config.read_text())["metrics_listen"]


def container_sample(samples: dict, name: str, node: str, container: str, **labels: str) -> float:
    return samples[(name, tuple(sorted({"node": node, "container": container, **labels}.items())))]


async def test_metrics_match_ct_stats(lab, corral, cleanup):
    name = "mtrsta"
    cleanup.append(name)
    await corral("ct", "create", name, "-t", "busybox", "--node", "n1", "--memory", "48M", "--pids", "40",
                 "--cpus", "0.5", "--start")  # fmt: skip
    await corral("ct", "exec", name, "--", "sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done")
    before = await corral.json("ct", "stats", name, "--interval", "0")
    host = next(h for h in lab.hosts if h.node == "n1")
    samples = await asyncio.to_thread(scrape, metrics_address(host.config))
    after = await corral.json("ct", "stats", name, "--interval", "0")

    def metric(metric_name: str, **labels: str) -> float:
        return container_sample(samples, metric_name, "n1", name, **labels)

    assert before["state"] == "running" and before["node"] == "n1", before
    assert before["memory_limit_bytes"] == 48 << 20 == metric("corral_container_memory_limit_bytes")
    assert before["pids_limit"] == 40 == metric("corral_container_pids_limit")
    assert before["cpu_limit_millis"] == 500 and metric("corral_container_cpu_limit_cpus") == 0.5
    for event, field in (("max", "memory_max_events"), ("oom_kill", "memory_oom_kill_events")):
        assert metric("corral_container_memory_events_total", event=event) == before[field] == after[field]
    assert metric("corral_container_pids_max_events_total") == before["pids_max_events"]
    cpu = metric("corral_container_cpu_usage_seconds_total")
    eps = 1e-9  # the metric is usec * 1e-6, the check usec / 1e6: they may differ in the last bit
    assert 0 < before["cpu_usage_usec"] / 1e6 <= cpu + eps and cpu <= after["cpu_usage_usec"] / 1e6 + eps  # monotone
    assert 0 < metric("corral_container_memory_bytes") < 48 << 20 and metric("corral_container_pids") >= 1
    assert metric("corral_container_disk_used_bytes") > 0 and before["disk_used_bytes"] > 0
    assert samples[("corral_node_containers", (("node", "n1"), ("state", "running")))] >= 1
    assert samples[("corral_node_cpus", (("node", "n1"),))] >= 1
    assert samples[("corral_agent_heartbeat_seconds_count", ())] > 0

    fleet = await asyncio.to_thread(scrape, metrics_address(lab.controller_config))
    assert fleet[("corral_controller_nodes", (("state", "ready"),))] == len(lab.hosts)
    assert fleet[("corral_controller_containers_desired", (("state", "running"),))] >= 1
    assert fleet[("corral_controller_containers", (("state", "running"),))] >= 1
    assert fleet[("corral_controller_heartbeats_total", ())] > 0
    assert fleet[("corral_controller_heartbeat_handling_seconds_count", ())] > 0
    assert fleet[("corral_controller_operations_total", (("kind", "create"), ("outcome", "succeeded")))] >= 1

    # The rate over an interval: ct stats samples twice.
    rated = await corral.json("ct", "stats", name, "--interval", "0.5")
    assert rated["cpu_rate"] is not None and rated["cpu_rate"] >= 0


async def test_memory_limit_hits_and_oom_kills_are_counted(lab, corral, cleanup):
    name = "mtroom"
    cleanup.append(name)
    await corral("ct", "create", name, "-t", "busybox", "--node", "n2", "--memory", "32M", "--start")
    start = await corral.json("ct", "stats", name, "--interval", "0")
    assert start["memory_oom_kill_events"] == 0 and start["memory_limit_bytes"] == 32 << 20
    # One process wanting 200 MiB (dd's buffer): past the limit, the OOM killer ends it. (Not a
    # pipeline: the kernel may then pick the container's init as a second victim.)
    hog = await corral("ct", "exec", name, "--", "dd", "if=/dev/zero", "of=/dev/null", "bs=200M", "count=1",
                       check=False)  # fmt: skip
    assert hog.returncode != 0, hog
    stats = await corral.json("ct", "stats", name, "--interval", "0")
    assert stats["memory_max_events"] > 0, stats
    assert stats["memory_oom_kill_events"] >= 1, stats
    assert stats["state"] == "running"  # the container lives on: only the hog was killed
    host = next(h for h in lab.hosts if h.node == "n2")
    samples = await asyncio.to_thread(scrape, metrics_address(host.config))
    killed = container_sample(samples, "corral_container_memory_events_total", "n2", name, event="oom_kill")
    assert killed == stats["memory_oom_kill_events"]


async def test_top_lists_the_fleet(lab, corral, cleanup):
    names = ["mtrtp1", "mtrtp2"]
    cleanup.extend(names)
    await corral("ct", "create", names[0], "-t", "busybox", "--node", "n1", "--start")
    await corral("ct", "create", names[1], "-t", "busybox", "--node", "n3")  # stopped: listed too, no cgroup
    table = await corral("top", "--once", "--interval", "0.5")
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines() if line.strip()}
    assert rows["NAME"][:4] == ["NAME", "NODE", "STATE", "CPU"]
    assert rows[names[0]][1:3] == ["n1", "running"] and rows[names[0]][3].endswith("%")
    assert rows[names[1]][1:3] == ["n3", "stopped"]
    doc = await corral.json("top", "--once", "--interval", "0.2")
    listed = {s["name"]: s for s in doc["stats"]}
    assert {*names} <= set(listed) and doc["unanswered"] == {}
    assert listed[names[0]]["cpu_rate"] is not None and listed[names[0]]["pids"] >= 1
    one_node = await corral.json("top", "--once", "--node", "n3", "--interval", "0.2")
    assert {s["node"] for s in one_node["stats"]} == {"n3"}
