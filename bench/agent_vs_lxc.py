"""Benchmark: container start and force-stop through corral-agent vs raw LXC.

Brings up a one-host lab (or uses `--lab NAME` if it is up), then runs the
measurement *inside* that lab host (its network namespace, its cgroups), so
both sides pay the same costs: the agent's StartContainer/StopContainer over
its mTLS gRPC API, and `lxc-start -d`/`lxc-stop -k` of an identical container
(same config and rootfs) in a separate LXC path. Repetitions interleave the two.

    python bench/agent_vs_lxc.py [-n 30] [--lab bnc] [--keep]

Prints medians and the ratio agent/raw (target <= 1.15) and writes JSON to
bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TARGET = 1.15


async def inner(args) -> dict:
    """Runs inside the lab host."""
    from corral import proc
    from corral.api.tls import secure_channel
    from corral.config import TlsFiles
    from corral.v1 import agent_pb2 as apb
    from corral.v1 import agent_pb2_grpc

    pki = Path(args.pki)
    tls = TlsFiles(pki / "ca.crt", pki / "controller-controller.crt", pki / "controller-controller.key")
    channel = secure_channel(args.agent, tls, server_name=args.node)
    agent = agent_pb2_grpc.AgentServiceStub(channel)
    name = "bench-agent"
    raw_path = Path(args.raw_path)

    if (Path(args.lxc_path) / name).exists():  # left by an interrupted run
        await agent.DestroyContainer(apb.AgentDestroyContainerRequest(name=name, force=True), timeout=60)
    await agent.CreateContainer(apb.AgentCreateContainerRequest(name=name, template="busybox"), timeout=120)
    # The raw twin: the very config and rootfs the agent made, in an LXC path of its own.
    shutil.rmtree(raw_path, ignore_errors=True)
    (raw_path / name).mkdir(parents=True)
    config = (Path(args.lxc_path) / name / "config").read_text()
    config = config.replace(str(Path(args.lxc_path) / name), str(raw_path / name))
    (raw_path / name / "config").write_text(config)

    async def raw_start():
        await proc.run(["lxc-start", "-P", str(raw_path), "-n", name, "-d"], timeout=60)

    async def raw_stop():
        await proc.run(["lxc-stop", "-P", str(raw_path), "-n", name, "-k"], timeout=60)

    async def agent_start():
        await agent.StartContainer(apb.AgentStartContainerRequest(name=name), timeout=60)

    async def agent_stop():
        await agent.StopContainer(apb.AgentStopContainerRequest(name=name, force=True), timeout=60)

    async def timed(fn) -> float:
        t0 = time.perf_counter()
        await fn()
        return (time.perf_counter() - t0) * 1000

    samples: dict[str, list[float]] = {"raw_start": [], "raw_stop": [], "agent_start": [], "agent_stop": []}
    # Warm-up, then interleaved repetitions (alternating who goes first).
    for fn in (raw_start, raw_stop, agent_start, agent_stop):
        await fn()
    for i in range(args.n):
        pairs = [("raw", raw_start, raw_stop), ("agent", agent_start, agent_stop)]
        for label, start, stop in pairs if i % 2 == 0 else reversed(pairs):
            samples[f"{label}_start"].append(await timed(start))
            await asyncio.sleep(0.05)
            samples[f"{label}_stop"].append(await timed(stop))
            await asyncio.sleep(0.05)
    await agent.DestroyContainer(apb.AgentDestroyContainerRequest(name=name, force=True), timeout=60)
    shutil.rmtree(raw_path, ignore_errors=True)
    await channel.close()
    return samples


def summarize(samples: dict[str, list[float]]) -> dict:
    med = {k: statistics.median(v) for k, v in samples.items()}
    out = {"medians_ms": {k: round(v, 2) for k, v in med.items()}, "n": len(samples["raw_start"])}
    out["ratio_start"] = round(med["agent_start"] / med["raw_start"], 3)
    out["ratio_stop"] = round(med["agent_stop"] / med["raw_stop"], 3)
    out["ratio_start_stop"] = round(
        (med["agent_start"] + med["agent_stop"]) / (med["raw_start"] + med["raw_stop"]), 3
    )
    return out


async def outer(args) -> int:
    import lab as corral_lab

    info = await corral_lab.lab_status(args.lab)
    started = False
    if info is None:
        info = await corral_lab.lab_up(name=args.lab, nodes=1)
        started = True
    host = info.hosts[0]
    try:
        argv = corral_lab.host_command(args.lab, host.node, [
            sys.executable, str(Path(__file__).resolve()), "--inner", "-n", str(args.n),
            "--agent", host.agent_address, "--node", host.node, "--pki", str(info.pki_dir),
            "--lxc-path", str(host.lxc_path), "--raw-path", str(info.base_dir / "bench-raw"),
        ])  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return 1
        samples = json.loads(done.stdout)
    finally:
        if started and not args.keep:
            await corral_lab.lab_down(args.lab)
    result = summarize(samples)
    result["target_ratio"] = TARGET
    m = result["medians_ms"]
    print(f"start  (median of {result['n']}): agent {m['agent_start']:.1f} ms, raw lxc-start {m['raw_start']:.1f} ms, ratio {result['ratio_start']:.2f}")
    print(f"stop -k(median of {result['n']}): agent {m['agent_stop']:.1f} ms, raw lxc-stop  {m['raw_stop']:.1f} ms, ratio {result['ratio_stop']:.2f}")
    print(f"start+stop ratio {result['ratio_start_stop']:.2f} (target <= {TARGET})")
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out_dir / f"agent_vs_lxc-{stamp}.json").write_text(json.dumps({"result": result, "samples": samples}, indent=2))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=30)
    p.add_argument("--lab", default="bnc")
    p.add_argument("--keep", action="store_true", help="leave the lab up if this run brought it up")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    for opt in ("--agent", "--node", "--pki", "--lxc-path", "--raw-path"):
        p.add_argument(opt, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inner:
        print(json.dumps(asyncio.run(inner(args))))
        return 0
    return asyncio.run(outer(args))


if __name__ == "__main__":
    sys.exit(main())
