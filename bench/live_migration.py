"""Benchmark: live-migration downtime between two lab hosts, beside the local floor.

For each workload size (a small container; 256 MiB and 1 GiB of process memory
being dirtied at --rate MB/s) this brings a 2-host lab up (or uses `--lab NAME`
if it is up), creates a busybox container through the controller, and then, in
each repetition, on the host the container is on:

- floor: the same container checkpointed and restored in place with the raw
  tool, `lxc-checkpoint -s -D DIR` then `lxc-checkpoint -r -d -D DIR`, run
  inside that lab host. Reported both as the span (launch of the dump to the
  end of the restore) and as freeze-to-running (CRIU's own freezing + frozen
  time, then the restore), which is how the product counts its downtime;
- stop-and-copy: `migrate --live` to the other host, `timings_ms` of the
  operation (downtime, freeze, criu_frozen, transfer, restore, ...);
- post-copy, where both nodes offer it (`live_strategies`): `migrate --live
  --postcopy`, its downtime and the time until every page has moved.

Repetitions alternate the direction (n1->n2, n2->n1, ...) and, with post-copy,
which strategy goes first. Medians, the ratio stop-and-copy/floor and pass/fail
against the targets (DESIGN.md) are printed; JSON goes to bench/results/.
Everything the run made (containers; the lab if it brought it up) is removed,
also on error or Ctrl-C.

    python bench/live_migration.py                      # quick: small container, 3 repetitions
    python bench/live_migration.py --sizes small,256M,1G -n 3

The memory workload is busybox `awk` (no compiled code): it holds SIZE in 60 KiB
strings of varied bytes (real anonymous memory, checked with VmRSS) and, fed
ten ticks a second by a shell loop through a pipe, rewrites rate/10 MB of them
per tick. Both are started by the container's init, so CRIU can dump them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.runtime.tool_process import restored_monitor  # noqa: E402  (after the path is set)

LAB_NODES = ("n1", "n2")
STOP_AND_COPY, POST_COPY = "stop-and-copy", "post-copy"
TARGET_RATIO = 1.2  # stop-and-copy downtime vs the floor, same container, same run
TARGET_SMALL_MS = 300.0  # small container, freeze to running
TARGET_1G_POSTCOPY_MS = 500.0  # 1 GiB being dirtied, post-copy
SETTLE_S = 1.0  # between measurements: let the last one's helpers exit and the CPU calm down
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

COUNTER_AND_DIRTIER = """#!/bin/sh
# Started by init (so CRIU can dump it): a counter, and MB MiB of memory dirtied at RATE MB/s.
echo $$ > /tmp/workload.pid
if [ {mb} -gt 0 ]; then
    (while :; do echo t; usleep 100000; done) | awk -v MB={mb} -v RATE={rate} -f /etc/dirty.awk &
fi
i=0
while :; do i=$((i+1)); echo $i > /tmp/counter; usleep 100000; done
"""

DIRTY_AWK = r"""# Holds MB MiB in 60 KiB strings of varied bytes; on each input line (a tick,
# ten a second) rewrites RATE/10 MB of them, so RATE MB/s of memory gets dirtied.
BEGIN {
    srand(1)
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    seed = ""
    for (k = 0; k < 4096; k++) seed = seed substr(chars, int(rand() * 62) + 1, 1)
    chunk = seed; while (length(chunk) < 65536) chunk = chunk chunk
    n = int(MB * 1048576 / 61440)
    for (i = 0; i < n; i++) a[i] = substr(chunk, 1 + (i % 4096), 61440 - 12) sprintf("%12d", i)
    per_tick = int(RATE * 1000000 / 10 / 61440); if (per_tick < 1) per_tick = 1
    j = 0
    printf "%d\n", n > "/tmp/dirty.ready"; close("/tmp/dirty.ready")
}
{
    for (k = 0; k < per_tick; k++) {
        a[j] = substr(chunk, 1 + ((j + NR) % 4096), 61440 - 12) sprintf("%12d", NR)
        j = (j + 1) % n
    }
}
"""


@dataclass(frozen=True)
class Size:
    label: str
    mb: int  # MiB of process memory being dirtied (0: the counter alone)

    @property
    def container(self) -> str:
        return f"lmb-{self.label.lower()}"

    @property
    def memory_limit(self) -> str:
        return f"{self.mb + 256}M" if self.mb else "128M"


def parse_size(text: str) -> Size:
    t = text.strip()
    if t.lower() == "small":
        return Size("small", 0)
    units = {"M": 1, "G": 1024}
    if len(t) >= 2 and t[-1].upper() in units and t[:-1].isdigit() and int(t[:-1]) > 0:
        return Size(t[:-1] + t[-1].upper(), int(t[:-1]) * units[t[-1].upper()])
    raise argparse.ArgumentTypeError(f"bad size {text!r}: 'small' or a number with M or G, like 256M or 1G")


# -- inside a lab host: the floor ------------------------------------------------------------


def _run_tool(argv: list[str], output: Path, timeout: float) -> tuple[int, float, subprocess.Popen]:
    """Run a tool with its output to a file (a restored container keeps it open), its own
    process group, a deadline. Returns (exit code, wall ms, the process)."""
    env = {k: v for k, v in os.environ.items() if k != "CRIU_CONFIG_FILE"}
    env["PATH"] = PATH
    with open(output, "ab") as out:
        t0 = time.perf_counter()
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, cwd="/",
                                 start_new_session=True)  # fmt: skip
    try:
        rc = child.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        raise RuntimeError(f"{' '.join(argv[:1] + argv[-3:])} did not finish in {timeout:g} s") from None
    return rc, (time.perf_counter() - t0) * 1000, child


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no {path.name})"
    errors = [line for line in text if line.startswith("Error")]
    return " | ".join((errors or text)[-lines:])


def inner_floor(args) -> dict:
    """`lxc-checkpoint -s` then `lxc-checkpoint -r -d` of NAME in LXC path P, on this host."""
    from agent.runtime.criu_stats import read_dump_stats, read_restore_stats

    lxc_path, name, images = Path(args.lxc_path), args.name, Path(args.images)
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True, mode=0o700)
    base = ["lxc-checkpoint", "-P", str(lxc_path), "-n", name, "-D", str(images)]
    restore_flags = []
    config = (lxc_path / name / "config").read_text()
    if not Path("/sys/kernel/security/apparmor").exists() and "lxc.apparmor." in config:
        # CRIU refuses LXC's AppArmor profile on a kernel without AppArmor (lxc-start ignores it):
        # restore from a copy of the config without those keys, as the agent does.
        rcfile = images.parent / f"{images.name}.rcfile"
        rcfile.write_text("".join(line + "\n" for line in config.splitlines() if not line.strip().startswith("lxc.apparmor.")))
        restore_flags.append(f"--rcfile={rcfile}")
    try:
        t0 = time.perf_counter()
        rc, dump_ms, _ = _run_tool([*base, "-s"], images / "lxc-checkpoint.out", 300)
        if rc != 0:
            raise RuntimeError(f"lxc-checkpoint -s exited {rc}: {_log_tail(images / 'dump.log')}")
        t_dumped = time.perf_counter()
        rc, restore_ms, child = _run_tool([*base, "-r", "-d", *restore_flags], images / "lxc-restore.out", 300)
        t1 = time.perf_counter()
        if rc != 0:
            raise RuntimeError(f"lxc-checkpoint -r exited {rc}: {_log_tail(images / 'restore.log')}")
        # Tell the agent where the restored container's monitor is (as its own restore does):
        # it finds the container's init, and its freezer, through monitor.pid.
        monitor, _ = restored_monitor(child.pid)
        if monitor:
            (lxc_path / name / "monitor.pid").write_text(f"{monitor}\n")
        dump, restore = read_dump_stats(images), read_restore_stats(images)
        paused_ms = (dump.freezing_us + dump.frozen_us) / 1000
        return {
            "span": (t1 - t0) * 1000,  # launch of the dump to the end of the restore
            # Freeze to running: CRIU's pause (freezing + frozen, which ends when the dump is written),
            # then from the end of the dump to the end of the restore.
            "downtime": paused_ms + (t1 - t_dumped) * 1000,
            "dump_wall": dump_ms,
            "restore_wall": restore_ms,
            "criu_freezing": dump.freezing_us / 1000,
            "criu_frozen": dump.frozen_us / 1000,
            "criu_memdump": dump.memdump_us / 1000,
            "criu_memwrite": dump.memwrite_us / 1000,
            "criu_restore": restore.restore_us / 1000,
            "pages_written": dump.pages_written,
            "images_bytes": sum(f.stat().st_size for f in images.iterdir() if f.is_file()),
            "monitor_found": bool(monitor),
        }
    finally:
        shutil.rmtree(images, ignore_errors=True)
        for leftover in images.parent.glob(f"{images.name}.rcfile"):
            leftover.unlink(missing_ok=True)


# -- outside: the lab, the containers, the migrations ------------------------------------------


class Bench:
    def __init__(self, args, info, fleet) -> None:
        self.args, self.info, self.fleet = args, info, fleet

    def log(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    async def exec_ok(self, name: str, argv: list[str], stdin: bytes = b"") -> str:
        r = await self.fleet.exec(name, argv, stdin=stdin, timeout=120)
        if r.exit_code != 0:
            raise RuntimeError(f"{' '.join(argv)[:80]} in {name} exited {r.exit_code}: {r.stderr.decode()[-300:]}")
        return r.stdout.decode()

    async def prepare(self, size: Size) -> dict:
        from corral.model import Limits
        from corral.units import parse_size as parse_bytes

        name = size.container
        with_stale = [c.name for c in await self.fleet.list_containers() if c.name == name]
        if with_stale:  # left by an interrupted run on a kept lab
            await self.fleet.destroy_container(name, force=True)
        limits = Limits(memory_bytes=parse_bytes(size.memory_limit, "memory"))
        await self.fleet.create_container(name, "busybox", node=LAB_NODES[0], limits=limits, start=True)
        workload = COUNTER_AND_DIRTIER.format(mb=size.mb, rate=self.args.rate)
        await self.exec_ok(name, ["sh", "-c", "cat > /etc/dirty.awk"], DIRTY_AWK.encode())
        await self.exec_ok(name, ["sh", "-c", "cat > /etc/init.d/workload.new && chmod +x /etc/init.d/workload.new"
                                  " && mv /etc/init.d/workload.new /etc/init.d/workload"], workload.encode())  # fmt: skip
        await self.exec_ok(name, ["sh", "-c", "kill $(pidof sleep)"])  # init respawns the workload
        deadline = time.monotonic() + 60 + size.mb / 20
        rss_kib = 0
        while True:
            probe = await self.fleet.exec(name, ["sh", "-c",
                "cat /tmp/counter; [ -s /tmp/dirty.ready ] && grep VmRSS /proc/$(pidof awk)/status || true"])  # fmt: skip
            lines = probe.stdout.decode().split("\n")
            counter = int(lines[0]) if lines and lines[0].strip().isdigit() else 0
            rss_kib = int(lines[1].split()[1]) if len(lines) > 1 and lines[1].startswith("VmRSS") else 0
            if counter > 3 and (size.mb == 0 or rss_kib >= size.mb * 1024 * 0.95):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: workload not ready (counter {counter}, awk VmRSS {rss_kib} KiB)")
            await asyncio.sleep(0.5)
        self.log(f"{name}: workload running" + (f", awk VmRSS {rss_kib / 1024:.0f} MiB" if size.mb else ""))
        return {"awk_vmrss_kib": rss_kib}

    async def floor(self, name: str, node: str) -> dict:
        import lab as corral_lab

        host = self.info.host(node)
        argv = corral_lab.host_command(self.info.name, node, [
            sys.executable, str(Path(__file__).resolve()), "--inner-floor", "--lxc-path", str(host.lxc_path),
            "--name", name, "--images", str(host.state_dir / "bench-floor" / name),
        ])  # fmt: skip
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(900):
            out, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"floor on {node} failed: {err.decode().strip()[-800:]}")
        await self.wait_running(name, node)
        return json.loads(out)

    async def wait_running(self, name: str, node: str) -> None:
        """Until the fleet (not only the agent) has it running on `node` again."""
        from corral.model import ContainerState

        async with asyncio.timeout(60):
            while True:
                ct = await self.fleet.get_container(name)
                listed = next((c for c in await self.fleet.list_containers(node) if c.name == name), None)
                if ct.node == node and ct.state == ContainerState.RUNNING and listed and listed.state == ct.state:
                    return
                await asyncio.sleep(0.2)

    async def migrate(self, name: str, target: str, strategy: str) -> dict:
        op = await self.fleet.migrate(name, target, live=True, postcopy=strategy == POST_COPY)
        final = await self.fleet.wait_operation(op.id)
        params = {k: json.loads(v) for k, v in final.params.items()}
        if final.state != "succeeded":
            raise RuntimeError(f"{strategy} migration of {name} to {target}: {final.state}: {final.error}")
        if params.get("strategy") != strategy:
            raise RuntimeError(f"asked for {strategy}, the controller ran {params.get('strategy')!r}")
        await self.wait_running(name, target)
        return {"op": final.id, "timings": dict(final.timings_ms),
                "result": {k: json.loads(v) for k, v in final.result.items()}}

    async def run_size(self, size: Size, strategies: list[str], out: dict) -> None:
        """Fills `out` as it goes: what was measured before a failure is kept."""
        name = size.container
        out.update({"size": size.label, "memory_mib": size.mb, "container": name,
                    "floor": [], STOP_AND_COPY: [], POST_COPY: []})  # fmt: skip
        out.update(await self.prepare(size))
        here, there = LAB_NODES
        for rep in range(self.args.n):
            order = strategies if rep % 2 == 0 else list(reversed(strategies))
            for strategy in order:
                if strategy == STOP_AND_COPY:
                    await asyncio.sleep(SETTLE_S)
                    sample = await self.floor(name, here)
                    sample["node"] = here
                    out["floor"].append(sample)
                    self.log(f"{name} rep {rep + 1}: floor on {here}: freeze-to-running {sample['downtime']:.0f} ms, "
                             f"span {sample['span']:.0f} ms (dump {sample['dump_wall']:.0f}, restore {sample['restore_wall']:.0f})")  # fmt: skip
                await asyncio.sleep(SETTLE_S)
                sample = await self.migrate(name, there, strategy)
                sample["from"], sample["to"] = here, there
                out[strategy].append(sample)
                t = sample["timings"]
                self.log(f"{name} rep {rep + 1}: {strategy} {here}->{there}: downtime {t.get('downtime', float('nan')):.0f} ms; "
                         + ", ".join(_fmt(k, v) for k, v in sorted(t.items()) if k != "downtime"))  # fmt: skip
                here, there = there, here
        await self.fleet.destroy_container(name, force=True)


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 1) if values else None


def _pages_key(timings: dict) -> str | None:
    """The post-copy timing for 'every page has moved' (its name is the product's choice)."""
    for key in ("pages_done", "pages_moved", "all_pages", "postcopy_done", "memory_done"):
        if key in timings:
            return key
    return next((k for k in sorted(timings) if "page" in k and not k.endswith(("_bytes", "_count"))), None)


def _fmt(key: str, value: float | None) -> str:
    if value is None:
        return f"{key} -"
    if key.endswith("_bytes"):
        return f"{key} {value / 1e6:.1f} MB"
    return f"{key} {value:.0f}"


def summarize(run: dict) -> dict:
    s: dict = {"size": run["size"]}
    if run.get("error"):
        s["incomplete"] = run["error"]
    floors = run["floor"]
    s["floor_downtime_ms"] = _median([f["downtime"] for f in floors])
    s["floor_span_ms"] = _median([f["span"] for f in floors])
    for key in ("dump_wall", "restore_wall", "criu_freezing", "criu_frozen", "criu_restore"):
        s[f"floor_{key}_ms"] = _median([f[key] for f in floors])
    for strategy in (STOP_AND_COPY, POST_COPY):
        samples = run[strategy]
        if not samples:
            continue
        keys = sorted({k for smp in samples for k in smp["timings"]})
        s[strategy] = {k: _median([smp["timings"].get(k) for smp in samples]) for k in keys}
        s[strategy]["n"] = len(samples)
        s[strategy]["directions"] = [f"{smp['from']}->{smp['to']}" for smp in samples]
    sc = s.get(STOP_AND_COPY, {})
    if sc.get("downtime") and s["floor_downtime_ms"]:
        s["ratio_stop_and_copy_vs_floor"] = round(sc["downtime"] / s["floor_downtime_ms"], 3)
        s["ratio_stop_and_copy_vs_floor_span"] = round(sc["downtime"] / s["floor_span_ms"], 3)
    pc = s.get(POST_COPY, {})
    if pc:
        s["postcopy_pages_key"] = _pages_key(pc)
    return s


def verdicts(summaries: list[dict], strategies: list[str]) -> list[dict]:
    out = []
    for s in summaries:
        ratio = s.get("ratio_stop_and_copy_vs_floor")
        if ratio is not None:
            out.append({"target": f"{s['size']}: stop-and-copy <= {TARGET_RATIO}x floor", "value": ratio,
                        "pass": ratio <= TARGET_RATIO})  # fmt: skip
        if s["size"] == "small":
            for strategy in strategies:
                d = s.get(strategy, {}).get("downtime")
                if d is not None:
                    out.append({"target": f"small: {strategy} downtime < {TARGET_SMALL_MS:g} ms", "value": d,
                                "pass": d < TARGET_SMALL_MS})  # fmt: skip
        if s["size"] == "1G":
            d = s.get(POST_COPY, {}).get("downtime")
            out.append({"target": f"1G: post-copy downtime < {TARGET_1G_POSTCOPY_MS:g} ms", "value": d,
                        "pass": None if d is None else d < TARGET_1G_POSTCOPY_MS})  # fmt: skip
    return out


def print_report(summaries: list[dict], checks: list[dict], postcopy_note: str) -> None:
    print()
    print("floor = lxc-checkpoint -s then -r -d of the same container on one host, same run;")
    print("downtime = freeze to running (the floor: CRIU freezing+frozen, then to the end of the restore).")
    print(f"{'size':<6} {'floor':>8} {'(span)':>8} {'s&c':>8} {'ratio':>6} {'post-copy':>10} {'all pages':>10}")
    for s in summaries:
        sc, pc = s.get(STOP_AND_COPY, {}), s.get(POST_COPY, {})
        pk = s.get("postcopy_pages_key")

        def ms(v):
            return f"{v:.0f} ms" if v is not None else "-"

        print(f"{s['size']:<6} {ms(s['floor_downtime_ms']):>8} {ms(s['floor_span_ms']):>8} {ms(sc.get('downtime')):>8} "
              f"{s.get('ratio_stop_and_copy_vs_floor', float('nan')):>5.2f}x {ms(pc.get('downtime')):>10} "
              f"{ms(pc.get(pk)) if pk else '-':>10}")  # fmt: skip
        print(f"       floor: dump {ms(s['floor_dump_wall_ms'])} (CRIU freezing {ms(s['floor_criu_freezing_ms'])}, "
              f"frozen {ms(s['floor_criu_frozen_ms'])}), restore {ms(s['floor_restore_wall_ms'])} "
              f"(CRIU {ms(s['floor_criu_restore_ms'])})")  # fmt: skip
        for strategy, t in ((STOP_AND_COPY, sc), (POST_COPY, pc)):
            if t:
                keys = [k for k in t if k not in ("n", "directions")]
                print(f"       {strategy} medians (ms): " + ", ".join(_fmt(k, t[k]) for k in keys))
    if postcopy_note:
        print(f"post-copy: {postcopy_note}")
    for c in checks:
        verdict = {True: "PASS", False: "FAIL", None: "not measured"}[c["pass"]]
        value = "-" if c["value"] is None else f"{c['value']:g}"
        print(f"{verdict:<12} {c['target']} (measured {value})")


async def outer(args) -> int:
    from controller.cli.settings import CliSettings
    from controller.client import ControllerClient
    import lab as corral_lab

    info = await corral_lab.lab_status(args.lab)
    started = False
    if info is None or len(info.hosts) < 2:
        if info is not None:
            print(f"lab {args.lab} has fewer than 2 hosts", file=sys.stderr)
            return 2
        info = await corral_lab.lab_up(name=args.lab, nodes=len(LAB_NODES))
        started = True
    runs, errors = [], []
    try:
        settings = CliSettings.load(info.cli_config)
        async with ControllerClient(settings.controller, settings.tls, timeout=900) as fleet:
            bench = Bench(args, info, fleet)
            nodes = [await fleet.get_node(n) for n in LAB_NODES]
            facts = {n.name: {"live_strategies": list(n.facts.live_strategies),
                              "live_unavailable": dict(n.facts.live_unavailable),
                              "criu": n.facts.criu_version, "kernel": n.facts.kernel} for n in nodes}  # fmt: skip
            strategies = [s for s in (STOP_AND_COPY, POST_COPY) if all(s in n.facts.live_strategies for n in nodes)]
            postcopy_note = ""
            if POST_COPY not in strategies:
                why = "; ".join(f"{n.name}: {n.facts.live_unavailable.get(POST_COPY, 'not listed')}"
                                for n in nodes if POST_COPY not in n.facts.live_strategies)  # fmt: skip
                postcopy_note = f"not offered by the nodes ({why})"
                bench.log(f"post-copy: {postcopy_note}")
            if STOP_AND_COPY not in strategies:
                raise RuntimeError(f"the nodes offer no stop-and-copy live migration: {facts}")
            try:
                for size in args.sizes:
                    run: dict = {}
                    try:
                        await bench.run_size(size, strategies, run)
                    except Exception as exc:  # noqa: BLE001 - report it, go on with the next size
                        errors.append({"size": size.label, "error": str(exc)})
                        run["error"] = str(exc)
                        bench.log(f"{size.label}: FAILED: {exc}")
                    if run.get("floor"):
                        runs.append(run)
            finally:
                for size in args.sizes:  # whatever is left of this run's containers
                    try:
                        if any(c.name == size.container for c in await fleet.list_containers()):
                            await fleet.destroy_container(size.container, force=True)
                    except Exception as exc:  # noqa: BLE001
                        bench.log(f"cleanup of {size.container} failed: {exc}")
    finally:
        if started and not args.keep:
            await corral_lab.lab_down(args.lab)

    summaries = [summarize(r) for r in runs]
    checks = verdicts(summaries, strategies)
    print_report(summaries, checks, postcopy_note)
    for e in errors:
        print(f"ERROR        {e['size']}: {e['error']}")
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"live_migration-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({
        "config": {"sizes": [s.label for s in args.sizes], "n": args.n, "rate_mb_s": args.rate, "lab": args.lab},
        "nodes": facts, "strategies": strategies, "postcopy_note": postcopy_note,
        "targets": {"ratio": TARGET_RATIO, "small_ms": TARGET_SMALL_MS, "1g_postcopy_ms": TARGET_1G_POSTCOPY_MS},
        "summary": summaries, "checks": checks, "errors": errors, "runs": runs,
    }, indent=2))  # fmt: skip
    print(f"results: {path.relative_to(REPO)}")
    return 1 if errors else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="small", type=lambda t: [parse_size(x) for x in t.split(",") if x.strip()],
                   help="comma-separated: small, 256M, 1G, ... (default: small)")  # fmt: skip
    p.add_argument("-n", type=int, default=3, help="repetitions per size and strategy (default 3)")
    p.add_argument("--rate", type=int, default=20, help="MB/s of memory dirtied by the sized workloads (default 20)")
    p.add_argument("--lab", default="lmb")
    p.add_argument("--keep", action="store_true", help="leave the lab up if this run brought it up")
    p.add_argument("--inner-floor", action="store_true", help=argparse.SUPPRESS)
    for opt in ("--lxc-path", "--name", "--images"):
        p.add_argument(opt, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inner_floor:
        print(json.dumps(inner_floor(args)))
        return 0
    if args.n < 1:
        p.error("-n must be at least 1")
    return asyncio.run(outer(args))


if __name__ == "__main__":
    sys.exit(main())
