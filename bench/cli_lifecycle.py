"""Benchmark: container lifecycle through the `corral` CLI, layer by layer, vs raw LXC and Incus.

Brings up a one-host lab (or uses `--lab NAME` if it is up) and times, over N
interleaved repetitions, the five lifecycle steps (create, start, exec
/bin/true, force stop, destroy) through each layer of the stack:

    raw         lxc-copy / lxc-start -d / lxc-attach / lxc-stop -k / lxc-destroy,
                run *inside* the lab host on an identical container (own LXC path)
    agent       the agent's gRPC API, from inside the lab host, warm mTLS channel
    controller  the controller's gRPC API, from this process, warm mTLS channel
    corral      the `corral` command, spawn to reap (what a user waits for)
    corral-nohelper   the same with CORRAL_NO_HELPER=1 (always in-process)
    corral-alt  another installation's `corral` (--alt-corral PATH, e.g. a wheel installed in a venv)
    incus       `incus` (privileged container) where it is installed and --incus-image exists

and prints min/median/max per step, then a breakdown of each step's median:
the raw tool, the agent's handling (agent - raw), the controller's handling
(controller - agent), and the CLI's own cost (corral - controller), which is
split further with measurements of a fresh interpreter, the CLI's imports,
and a new channel's TLS set-up and first call.

    python bench/cli_lifecycle.py [-n 8] [--lab clb] [--keep] [--systems raw,agent,...]

Writes JSON to bench/results/. For repeated single commands, `hyperfine`
(Debian package) is a handy cross-check but is not needed.

What the helper leaves of a command's cost is mostly a fresh interpreter
(`corral --version` through the helper takes about as long as `python -c pass`).
Two things of the machine weigh on that: an editable install (`pip install -e`)
adds a .pth finder that imports pathlib at every start (~15 ms here; compare
--alt-corral with a wheel installed in a venv), and PYTHONDONTWRITEBYTECODE=1
makes Python compile the launcher (and, in-process, the whole CLI) at every run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

OPS = ("create", "start", "exec_true", "stop_force", "destroy")
ALL_SYSTEMS = ("raw", "agent", "controller", "corral", "corral-nohelper", "corral-alt", "incus")
BASE = "cbench-base"  # the raw twin's source container
# The raw and agent-API containers use one fixed address (one runs at a time), outside the
# controller's range (.100-.250), so they never clash with containers the controller placed.
FIXED_HOST_OCTET = 252


# --- inside the lab host ----------------------------------------------------------------


class Inner:
    """Runs in the lab host: raw lxc-* tools and the agent's API, timed where they run."""

    def __init__(self, args) -> None:
        self.args = args
        self.lxc_path = Path(args.lxc_path)
        self.raw_path = Path(args.raw_path)

    async def setup(self) -> None:
        from corral.api.tls import secure_channel
        from corral.config import TlsFiles
        from corral.v1 import agent_pb2 as apb
        from corral.v1 import agent_pb2_grpc
        from corral.v1 import types_pb2

        self.apb = apb
        pki = Path(self.args.pki)
        tls = TlsFiles(pki / "ca.crt", pki / "controller-controller.crt", pki / "controller-controller.key")
        self.channel = secure_channel(self.args.agent, tls, server_name=self.args.node)
        self.agent = agent_pb2_grpc.AgentServiceStub(self.channel)
        octets = [int(o) for o in self.args.subnet_gateway.split(".")]
        ip = ".".join(map(str, octets[:3] + [FIXED_HOST_OCTET]))
        mac = "02:cc:" + ":".join(f"{o:02x}" for o in octets[:3] + [FIXED_HOST_OCTET])
        self.network = types_pb2.NetworkAttachment(ipv4_cidr=f"{ip}/24", gateway=self.args.subnet_gateway, mac=mac)
        # The raw twin: the very config and rootfs the agent makes, in an LXC path of its own.
        await self._agent_destroy(BASE, check=False)
        await self._agent_create(BASE)
        shutil.rmtree(self.raw_path, ignore_errors=True)
        (self.raw_path / "base").mkdir(parents=True)
        config = (self.lxc_path / BASE / "config").read_text()
        rootfs = next(line.split("dir:", 1)[1] for line in config.splitlines() if line.startswith("lxc.rootfs.path"))
        config = config.replace(rootfs, str(self.raw_path / "base" / "rootfs"))
        config = config.replace(str(self.lxc_path / BASE), str(self.raw_path / "base")).replace(BASE, "base")
        (self.raw_path / "base" / "config").write_text(config)
        subprocess.run(["cp", "-a", rootfs, str(self.raw_path / "base" / "rootfs")], check=True)
        await self._agent_destroy(BASE)

    async def _agent_create(self, name: str) -> None:
        req = self.apb.AgentCreateContainerRequest(name=name, template="busybox", network=self.network)
        await self.agent.CreateContainer(req, timeout=120)

    async def _agent_destroy(self, name: str, check: bool = True) -> None:
        import grpc

        try:
            await self.agent.DestroyContainer(self.apb.AgentDestroyContainerRequest(name=name, force=True), timeout=60)
        except grpc.aio.AioRpcError:
            if check:
                raise

    def raw_argv(self, op: str, name: str) -> list[str]:
        p = ["-P", str(self.raw_path)]
        return {
            "create": ["lxc-copy", *p, "-n", "base", "-N", name],
            "start": ["lxc-start", *p, "-n", name, "-d"],
            "exec_true": ["lxc-attach", *p, "-n", name, "--", "/bin/true"],
            "stop_force": ["lxc-stop", *p, "-n", name, "-k"],
            "destroy": ["lxc-destroy", *p, "-n", name],
            "cleanup": ["sh", "-c", f"lxc-stop {' '.join(p)} -n {name} -k; lxc-destroy {' '.join(p)} -n {name} -f"],
        }[op]

    async def agent_op(self, op: str, name: str) -> None:
        apb = self.apb
        if op == "create":
            await self._agent_create(name)
        elif op == "start":
            await self.agent.StartContainer(apb.AgentStartContainerRequest(name=name), timeout=60)
        elif op == "exec_true":
            replies = [r async for r in self.agent.Exec(apb.ExecRequest(name=name, argv=["/bin/true"]), timeout=60)]
            assert replies[-1].exit.exit_code == 0, replies
        elif op == "stop_force":
            await self.agent.StopContainer(apb.AgentStopContainerRequest(name=name, force=True), timeout=60)
        elif op == "destroy":
            await self.agent.DestroyContainer(apb.AgentDestroyContainerRequest(name=name), timeout=60)
        elif op == "cleanup":
            await self._agent_destroy(name, check=False)

    async def handle(self, req: dict) -> dict:
        system, op, name = req["system"], req["op"], req["name"]
        t0 = time.perf_counter()
        if system == "raw":
            done = await asyncio.to_thread(subprocess.run, self.raw_argv(op, name), capture_output=True)
            ms = (time.perf_counter() - t0) * 1000
            ok = done.returncode == 0 or op == "cleanup"
            return {"ms": ms, "ok": ok, "error": done.stderr.decode(errors="replace")[-500:]}
        try:
            await self.agent_op(op, name)
        except Exception as exc:  # reported to the outer side, which counts a failure
            return {"ms": 0, "ok": False, "error": str(exc)[-500:]}
        return {"ms": (time.perf_counter() - t0) * 1000, "ok": True, "error": ""}

    async def serve(self) -> None:
        """One JSON request a line on stdin, one JSON answer a line on stdout."""
        await self.setup()
        print(json.dumps({"ready": True}), flush=True)
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            print(json.dumps(await self.handle(json.loads(line))), flush=True)
        shutil.rmtree(self.raw_path, ignore_errors=True)
        await self.channel.close()


# --- this side: the CLI, the controller's API, Incus ------------------------------------------


class InnerClient:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, argv: list[str]) -> "InnerClient":
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        client = cls(proc)
        ready = await asyncio.wait_for(proc.stdout.readline(), 180)
        if not ready:
            raise SystemExit("the bench's helper in the lab host failed to start (see above)")
        return client

    async def ask(self, system: str, op: str, name: str) -> dict:
        self.proc.stdin.write((json.dumps({"system": system, "op": op, "name": name}) + "\n").encode())
        await self.proc.stdin.drain()
        return json.loads(await self.proc.stdout.readline())

    async def close(self) -> None:
        self.proc.stdin.close()
        await self.proc.wait()


def timed_run(argv: list[str], env: dict[str, str]) -> dict:
    t0 = time.perf_counter()
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env=env, cwd="/")
    ms = (time.perf_counter() - t0) * 1000
    return {"ms": ms, "ok": done.returncode == 0, "error": (done.stderr or done.stdout).decode(errors="replace")[-500:]}


class Outer:
    def __init__(self, args, info) -> None:
        self.args = args
        self.info = info
        self.node = info.hosts[0].node
        self.corral = args.corral_bin or str(Path(sys.executable).with_name("corral"))
        self.alt_corral = args.alt_corral
        self.env = dict(os.environ, CORRAL_CONFIG=str(info.cli_config))
        self.env.pop("CORRAL_NO_HELPER", None)
        self.env_nohelper = dict(self.env, CORRAL_NO_HELPER="1")
        self.incus = shutil.which("incus")

    async def setup(self) -> None:
        from controller.cli.settings import CliSettings
        from controller.client import ControllerClient

        self.settings = CliSettings.load(self.info.cli_config)
        self.client = ControllerClient(self.settings.controller, self.settings.tls, timeout=120)
        await self.client.list_nodes()

    def cli_argv(self, op: str, name: str, binary: str | None = None) -> list[str]:
        tail = {
            "create": ["ct", "create", name, "--template", "busybox", "--node", self.node],
            "start": ["ct", "start", name],
            "exec_true": ["ct", "exec", name, "--", "/bin/true"],
            "stop_force": ["ct", "stop", "--force", name],
            "destroy": ["ct", "destroy", name],
            "cleanup": ["ct", "destroy", "--force", name],
        }[op]
        return [binary or self.corral, *tail]

    def incus_argv(self, op: str, name: str) -> list[str]:
        return {
            "create": ["incus", "init", self.args.incus_image, name, "-c", "security.privileged=true"],
            "start": ["incus", "start", name],
            "exec_true": ["incus", "exec", name, "--", "/bin/true"],
            "stop_force": ["incus", "stop", "--force", name],
            "destroy": ["incus", "delete", name],
            "cleanup": ["incus", "delete", "--force", name],
        }[op]

    async def controller_op(self, op: str, name: str) -> dict:
        t0 = time.perf_counter()
        try:
            if op == "create":
                await self.client.create_container(name, "busybox", node=self.node)
            elif op == "start":
                await self.client.start_container(name)
            elif op == "exec_true":
                result = await self.client.exec(name, ["/bin/true"])
                assert result.exit_code == 0
            elif op == "stop_force":
                await self.client.stop_container(name, force=True)
            elif op in ("destroy", "cleanup"):
                await self.client.destroy_container(name, force=op == "cleanup")
        except Exception as exc:
            return {"ms": 0, "ok": op == "cleanup", "error": str(exc)}
        return {"ms": (time.perf_counter() - t0) * 1000, "ok": True, "error": ""}

    async def step(self, inner: InnerClient, system: str, op: str, name: str) -> dict:
        if system in ("raw", "agent"):
            return await inner.ask(system, op, name)
        if system == "controller":
            return await self.controller_op(op, name)
        if system == "incus":
            return await asyncio.to_thread(timed_run, self.incus_argv(op, name), self.env)
        env = self.env_nohelper if system == "corral-nohelper" else self.env
        binary = self.alt_corral if system == "corral-alt" else None
        return await asyncio.to_thread(timed_run, self.cli_argv(op, name, binary), env)

    def incus_ready(self) -> bool:
        if not self.incus:
            return False
        done = subprocess.run(["incus", "image", "show", self.args.incus_image], capture_output=True)
        return done.returncode == 0

    # -- constant costs of a fresh CLI process ------------------------------------------

    def fixed_costs(self, reps: int) -> dict[str, list[float]]:
        py = sys.executable
        out: dict[str, list[float]] = {"interpreter": [], "interpreter -S": [], "interpreter+imports": [], "launcher": []}
        for _ in range(reps):
            out["interpreter"].append(timed_run([py, "-c", "pass"], self.env)["ms"])
            out["interpreter -S"].append(timed_run([py, "-S", "-c", "pass"], self.env)["ms"])
            out["interpreter+imports"].append(timed_run([py, "-c", "import controller.cli.main"], self.env)["ms"])
            launcher = timed_run([py, "-c", "import controller.cli.launcher"], self.env)
            if launcher["ok"]:  # the light entry point, where this version has one
                out["launcher"].append(launcher["ms"])
        return out

    async def channel_costs(self, reps: int) -> dict[str, list[float]]:
        from controller.client import ControllerClient

        out: dict[str, list[float]] = {"new_channel_first_call": [], "warm_call": []}
        for _ in range(reps):
            t0 = time.perf_counter()
            async with ControllerClient(self.settings.controller, self.settings.tls, timeout=30) as fresh:
                await fresh.list_nodes()
                out["new_channel_first_call"].append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            await self.client.list_nodes()
            out["warm_call"].append((time.perf_counter() - t0) * 1000)
        return out


def stats(samples: list[float]) -> dict:
    if not samples:
        return {"n": 0}
    return {"n": len(samples), "min": min(samples), "median": statistics.median(samples), "max": max(samples)}


def print_results(systems: list[str], samples: dict, failures: dict) -> None:
    print(f"\n{'system':<16} {'op':<11} {'n':>3} {'min':>8} {'median':>8} {'max':>8} {'fail':>4}")
    for system in systems:
        for op in OPS:
            s = stats(samples[system][op])
            fail = failures[system][op]
            if s["n"]:
                print(f"{system:<16} {op:<11} {s['n']:>3} {s['min']:>8.1f} {s['median']:>8.1f} {s['max']:>8.1f} {fail:>4}")
            else:
                print(f"{system:<16} {op:<11} {0:>3} {'-':>8} {'-':>8} {'-':>8} {fail:>4}")


def breakdown(samples: dict, fixed: dict, channel: dict) -> dict:
    med = {s: {op: statistics.median(v) if v else None for op, v in ops.items()} for s, ops in samples.items()}
    interp = statistics.median(fixed["interpreter"])
    imports = statistics.median(fixed["interpreter+imports"]) - interp
    launcher = statistics.median(fixed["launcher"]) - interp if fixed["launcher"] else None
    tls = statistics.median(channel["new_channel_first_call"]) - statistics.median(channel["warm_call"])
    rows = {}
    print("\nbreakdown of the medians (ms): each layer's own share of the step")
    nosite = statistics.median(fixed["interpreter -S"])
    print(f"  fresh process: interpreter {interp:.1f} (without site and its .pth files: {nosite:.1f}), CLI imports {imports:.1f} "
          f"(launcher module alone {launcher if launcher is None else round(launcher, 1)}), new channel TLS + first call {tls:.1f}")  # fmt: skip
    header = f"{'op':<11} {'raw tool':>9} {'agent':>7} {'contr.':>7} {'CLI in-proc':>12} {'= interp':>9} " \
             f"{'+imports':>9} {'+TLS':>6} {'+rest':>7} {'CLI helper':>11} {'corral':>8} {'incus':>7}"  # fmt: skip
    print(header)
    for op in OPS:
        raw = med.get("raw", {}).get(op)
        agent = med.get("agent", {}).get(op)
        ctl = med.get("controller", {}).get(op)
        nohelper = med.get("corral-nohelper", {}).get(op)
        corral = med.get("corral", {}).get(op)
        incus = med.get("incus", {}).get(op)
        row = {
            "raw_tool": raw,
            "agent_handling": agent - raw if agent is not None and raw is not None else None,
            "controller_handling": ctl - agent if ctl is not None and agent is not None else None,
            "cli_inprocess": nohelper - ctl if nohelper is not None and ctl is not None else None,
            "cli_helper": corral - ctl if corral is not None and ctl is not None else None,
            "corral": corral,
            "incus": incus,
        }
        rest = row["cli_inprocess"] - interp - imports - tls if row["cli_inprocess"] is not None else None
        row["cli_inprocess_rest"] = rest
        rows[op] = row

        def f(v, w):
            return f"{v:>{w}.1f}" if v is not None else f"{'-':>{w}}"

        print(f"{op:<11} {f(raw, 9)} {f(row['agent_handling'], 7)} {f(row['controller_handling'], 7)} "
              f"{f(row['cli_inprocess'], 12)} {f(interp, 9)} {f(imports, 9)} {f(tls, 6)} {f(rest, 7)} "
              f"{f(row['cli_helper'], 11)} {f(corral, 8)} {f(incus, 7)}")  # fmt: skip
    print("  agent = agent API - raw; contr. = controller API - agent API; CLI = command wall time - controller API;")
    print("  rest = click, config, exit (grpc shutdown) and what the table does not name.")
    print("\ntargets (medians): corral faster than Incus; stretch: within 50 ms of raw lxc-*")
    for op in OPS:
        row = rows[op]
        corral, incus, raw = row["corral"], row["incus"], row["raw_tool"]
        if corral is None:
            continue
        vs_incus = "-" if incus is None else f"{corral - incus:+.1f} ms vs Incus ({'faster' if corral < incus else 'SLOWER'})"
        vs_raw = "-" if raw is None else f"{corral - raw:+.1f} ms vs raw ({'within 50' if corral - raw <= 50 else 'over 50'})"
        print(f"  {op:<11} corral {corral:6.1f}  {vs_incus:<34} {vs_raw}")
    return {"fixed_ms": {"interpreter": interp, "interpreter_nosite": nosite, "cli_imports": imports,
                         "launcher_import": launcher, "tls_first_call": tls},
            "per_op_ms": rows}  # fmt: skip


async def outer(args) -> int:
    import lab as corral_lab

    info = await corral_lab.lab_status(args.lab)
    started = False
    if info is None or not info.controller_running:
        if info is not None:
            await corral_lab.lab_down(args.lab)
        info = await corral_lab.lab_up(name=args.lab, nodes=1)
        started = True
    host = info.hosts[0]
    bench = Outer(args, info)
    systems = [s for s in args.systems.split(",") if s]
    for s in systems:
        if s not in ALL_SYSTEMS:
            raise SystemExit(f"unknown system {s!r} (known: {', '.join(ALL_SYSTEMS)})")
    if "corral-alt" in systems and not args.alt_corral:
        systems.remove("corral-alt")
    if "incus" in systems and not bench.incus_ready():
        print(f"incus or its image {args.incus_image!r} is not here: leaving it out", file=sys.stderr)
        systems.remove("incus")
    inner = None
    samples = {s: {op: [] for op in OPS} for s in systems}
    failures = {s: {op: 0 for op in OPS} for s in systems}
    try:
        argv = corral_lab.host_command(args.lab, host.node, [
            sys.executable, str(Path(__file__).resolve()), "--inner", "--agent", host.agent_address,
            "--node", host.node, "--pki", str(info.pki_dir), "--lxc-path", str(host.lxc_path),
            "--raw-path", str(info.base_dir / "bench-cli-raw"), "--subnet-gateway", info.gateway,
        ])  # fmt: skip
        inner = await InnerClient.start(argv)
        await bench.setup()
        fixed = await asyncio.to_thread(bench.fixed_costs, max(5, args.n))
        channel = await bench.channel_costs(max(5, args.n))
        prefix = f"cb{os.getpid() % 10000}"
        for rep in range(-args.warmup, args.n):
            order = systems if rep % 2 == 0 else list(reversed(systems))
            print(f"rep {rep + 1}/{args.n}{' (warm-up)' if rep < 0 else ''}", file=sys.stderr, flush=True)
            for system in order:
                name = f"{prefix}-{system.replace('corral-nohelper', 'ncl')[:6]}-{rep + args.warmup}"
                for op in OPS:
                    result = await bench.step(inner, system, op, name)
                    if not result["ok"]:
                        failures[system][op] += rep >= 0
                        print(f"  {system} {op} {name} failed: {result['error'].strip()}", file=sys.stderr)
                        await bench.step(inner, system, "cleanup", name)
                        break
                    if rep >= 0:
                        samples[system][op].append(result["ms"])
                    if op == "start":
                        await asyncio.sleep(args.settle)  # let init come up, as a user would not notice
    finally:
        if inner is not None:
            await inner.close()
        if hasattr(bench, "client"):
            await bench.client.channel.close()
        if started and not args.keep:
            await corral_lab.lab_down(args.lab)
    print_results(systems, samples, failures)
    summary = breakdown(samples, fixed, channel)
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    doc = {"samples_ms": samples, "failures": failures, "fixed_ms": fixed, "channel_ms": channel, "summary": summary,
           "stats": {s: {op: stats(v) for op, v in ops.items()} for s, ops in samples.items()}}  # fmt: skip
    path = out_dir / f"cli_lifecycle-{stamp}.json"
    path.write_text(json.dumps(doc, indent=1))
    print(f"\nresults: {path}")
    return 1 if any(n for ops in failures.values() for n in ops.values()) else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=8, help="repetitions (default 8)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (default 1)")
    p.add_argument("--lab", default="clb", help="lab to use (brought up if it is not)")
    p.add_argument("--keep", action="store_true", help="leave the lab up if this run brought it up")
    p.add_argument("--systems", default=",".join(ALL_SYSTEMS), help=f"comma list of {', '.join(ALL_SYSTEMS)}")
    p.add_argument("--incus-image", default="bench-busybox", help="Incus image alias to create from")
    p.add_argument("--corral-bin", help="the `corral` to time (default: the one beside this Python)")
    p.add_argument("--alt-corral", help="another `corral` to time beside it, as system corral-alt")
    p.add_argument("--settle", type=float, default=0.2, help="seconds to wait after each start (default 0.2)")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    for opt in ("--agent", "--node", "--pki", "--lxc-path", "--raw-path", "--subnet-gateway"):
        p.add_argument(opt, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inner:
        asyncio.run(Inner(args).serve())
        return 0
    return asyncio.run(outer(args))


if __name__ == "__main__":
    sys.exit(main())
