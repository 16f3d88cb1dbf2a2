"""Benchmark: one real controller, N simulated hosts heartbeating every second.

Makes a fleet CA and certificates for the controller and N simulated nodes (corral/pki.py),
gives the controller a temporary SQLite store already holding the records of the containers
the hosts report (--containers per host), starts the controller (its own process, timed
from the inside: see below) and the simulated hosts (agent/simulated.py: the real agent's
membership code, containers in memory) in --workers processes, waits until every host has
registered, then measures for --seconds:

- heartbeats handled per second, and their handling time on the controller: each Heartbeat
  call timed by an interceptor outside the controller's own (access checks, validation,
  NodeRegistry.heartbeat, Fleet.observe, the reply; not the transport's (de)serialisation);
- the round trip as the agents see it (client side: transport, TLS and both event loops);
- the controller's CPU: utime + stime from /proc/PID/stat over the period, in % of one core.

    python bench/heartbeats.py [--hosts 1000] [--workers 4] [--seconds 60] [--containers 5] [--json]

The controller runs as `corral-controller` does (controller.main.serve, same config loader
and logging), with one more interceptor; `--serve-controller CONFIG` is that process.
Results depend on this machine; the README has the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.simulated import SUBNET_BASE, host_containers, host_name  # noqa: E402
from corral import pki  # noqa: E402

TIMED = ("Heartbeat", "RegisterNode")


# -- the controller, timed from the inside ------------------------------------------------------


def _timing_interceptor(samples: dict[str, list[float]]):
    import grpc

    class Timing(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation, details):
            handler = await continuation(details)
            method = details.method.rsplit("/", 1)[-1]
            if handler is None or method not in TIMED or not handler.unary_unary:
                return handler
            inner = handler.unary_unary

            async def timed(request, context):
                started = time.perf_counter()
                try:
                    return await inner(request, context)
                finally:
                    samples.setdefault(method, []).append(time.perf_counter() - started)

            return grpc.unary_unary_rpc_method_handler(timed, request_deserializer=handler.request_deserializer,
                                                       response_serializer=handler.response_serializer)  # fmt: skip

    return Timing()


def _heartbeat_buckets() -> dict[str, float]:
    """The controller's own heartbeat-handling histogram (controller/metrics.py): le -> count."""
    try:
        from controller.metrics import HEARTBEAT_SECONDS
    except ImportError:
        return {}
    return {s.labels["le"]: s.value for m in HEARTBEAT_SECONDS.collect() for s in m.samples
            if s.name.endswith("_bucket")}  # fmt: skip


def histogram_quantile(buckets: dict[str, float], q: float) -> float | None:
    """The upper bound (seconds) of the bucket holding quantile `q` (cumulative buckets)."""
    ordered = sorted(((float(le), n) for le, n in buckets.items()), key=lambda b: b[0])
    if not ordered or not ordered[-1][1]:
        return None
    return next(le for le, n in ordered if n >= q * ordered[-1][1])


def serve_controller(config_path: Path, status: Path) -> None:
    """corral-controller, with Heartbeat and RegisterNode timed by an outermost interceptor.
    SIGUSR1: samples cleared (the window starts); SIGUSR2: written to `status` as JSON."""
    import grpc

    import controller.main as controller_main
    from controller.config import ControllerConfig
    from corral import log as corral_log
    from corral.api import server as api_server

    samples: dict[str, list[float]] = {}

    def make_server(policy):
        policy.check()
        from corral.api.tls import server_options

        return grpc.aio.server(interceptors=[_timing_interceptor(samples), api_server.GuardInterceptor(policy)],
                               options=server_options(policy.max_connections),
                               maximum_concurrent_rpcs=policy.max_concurrent_rpcs)  # fmt: skip

    controller_main.make_server = make_server

    histogram: dict[str, dict[str, float]] = {}

    def start():
        samples.clear()
        histogram["start"] = _heartbeat_buckets()

    def dump():
        end = _heartbeat_buckets()
        buckets = {le: n - histogram.get("start", {}).get(le, 0) for le, n in end.items()}
        status.write_text(json.dumps({**{k: list(v) for k, v in samples.items()}, "histogram": buckets}))

    async def run(config):
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, start)
        loop.add_signal_handler(signal.SIGUSR2, dump)
        await controller_main.serve(config)

    config = ControllerConfig.load(config_path)
    corral_log.configure(json_output=True, level=config.log_level)
    if os.environ.get("CORRAL_BENCH_PROFILE"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            asyncio.run(run(config))
        finally:
            profiler.disable()
            profiler.dump_stats(os.environ["CORRAL_BENCH_PROFILE"])
    else:
        asyncio.run(run(config))


# -- the fleet ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_fleet(work: Path, hosts: int, *, prefix: str = "sim", containers: int = 0, port: int | None = None,
               heartbeat_timeout: float = 5.0) -> dict:  # fmt: skip
    """CA, certificates (controller, admin, every host), controller and CLI configs, and the
    store holding the hosts' containers' records. Returns the paths and the address."""
    import yaml

    pki_dir = work / "pki"
    pki.init_ca(pki_dir)
    pki.issue(pki_dir, "controller", pki.CONTROLLER_NAME, ["127.0.0.1"])
    pki.issue(pki_dir, "user", "admin")
    for i in range(hosts):
        pki.issue(pki_dir, "agent", host_name(prefix, i))
    address = f"127.0.0.1:{port or free_port()}"
    net = f"{SUBNET_BASE[0]}.{SUBNET_BASE[1]}"
    config = {
        "listen": [address],
        "store": {"backend": "sqlite", "path": str(work / "controller.db")},
        "tls": {"ca": str(pki_dir / "ca.crt"), "cert": str(pki_dir / "controller-controller.crt"),
                "key": str(pki_dir / "controller-controller.key")},
        "heartbeat_timeout": heartbeat_timeout,
        "network": {"subnet": f"{net}.0.0/16", "gateway": f"{net}.0.1", "range_start": f"{net}.0.10",
                    "range_end": f"{net}.255.250"},
    }  # fmt: skip
    (work / "controller.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cli = {"controller": address, "tls": {"ca": str(pki_dir / "ca.crt"), "cert": str(pki_dir / "user-admin.crt"),
                                          "key": str(pki_dir / "user-admin.key")}}  # fmt: skip
    (work / "cli.yaml").write_text(yaml.safe_dump(cli, sort_keys=False))
    if containers:
        asyncio.run(_seed_store(work / "controller.db", prefix, hosts, containers))
    return {"work": work, "pki": pki_dir, "address": address, "config": work / "controller.yaml",
            "cli": work / "cli.yaml"}  # fmt: skip


async def _seed_store(path: Path, prefix: str, hosts: int, per_host: int) -> None:
    from controller.store.sqlite import SqliteStore

    store = SqliteStore(path)
    await store.open()
    try:
        for i in range(hosts):
            for ct in host_containers(host_name(prefix, i), i, per_host):
                await store.insert_container(ct)
    finally:
        await store.close()


class Processes:
    """The benchmark's processes: started here, each stopped (SIGTERM, then SIGKILL) at exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 10) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)


def start_controller(procs: Processes, fleet: dict) -> subprocess.Popen:
    proc = procs.start([sys.executable, str(Path(__file__).resolve()), "--serve-controller", str(fleet["config"]),
                        "--status", str(fleet["work"] / "controller.samples.json")],
                       fleet["work"] / "controller.log")  # fmt: skip
    host, port = fleet["address"].rsplit(":", 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the controller exited {proc.returncode}: see {fleet['work'] / 'controller.log'}")
        try:
            socket.create_connection((host, int(port)), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the controller did not listen within 30 s")


def start_hosts(procs: Processes, fleet: dict, hosts: int, workers: int, *, prefix: str = "sim",
                containers: int = 0, ramp: float = 0.0) -> list[tuple[subprocess.Popen, Path]]:  # fmt: skip
    started = []
    for w in range(workers):
        first, last = hosts * w // workers, hosts * (w + 1) // workers
        status = fleet["work"] / f"hosts-{w}.json"
        argv = [sys.executable, "-m", "agent.simulated", "--controller", fleet["address"], "--pki", str(fleet["pki"]),
                "--first", str(first), "--count", str(last - first), "--prefix", prefix,
                "--containers", str(containers), "--ramp", str(ramp), "--status", str(status)]  # fmt: skip
        started.append((procs.start(argv, fleet["work"] / f"hosts-{w}.log"), status))
    return started


def read_status(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def wait_registered(workers: list[tuple[subprocess.Popen, Path]], hosts: int, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if any(p.poll() is not None for p, _ in workers):
            raise RuntimeError("a simulated-hosts process exited early: see its hosts-N.log")
        if sum(read_status(s).get("registered", 0) for _, s in workers) >= hosts:
            return time.monotonic() - started
        time.sleep(0.5)
    got = sum(read_status(s).get("registered", 0) for _, s in workers)
    raise RuntimeError(f"only {got} of {hosts} hosts registered within {timeout:.0f} s (a saturated controller "
                       "misses the agents' 1 s deadline, and they redial: see controller.log and hosts-N.log with --keep)")


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """utime + stime of process `pid` (all its threads), or of one of its threads."""
    stat = Path(f"/proc/{pid}/task/{thread}/stat" if thread else f"/proc/{pid}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"count": len(values), "p50_ms": at(0.50) * 1e3, "p99_ms": at(0.99) * 1e3, "max_ms": ordered[-1] * 1e3,
            "mean_ms": statistics.fmean(values) * 1e3}  # fmt: skip


def _wait_for(path: Path, key: str | None, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = read_status(path)
        if data and (key is None or key in data):
            return data
        time.sleep(0.1)
    raise RuntimeError(f"no measurements in {path} within {timeout:.0f} s")


def run(args: argparse.Namespace) -> dict:
    with ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="corral-hb-") if args.keep
                    else stack.enter_context(tempfile.TemporaryDirectory(prefix="corral-hb-")))  # fmt: skip
        t0 = time.monotonic()
        fleet = make_fleet(work, args.hosts, containers=args.containers)
        setup = time.monotonic() - t0
        procs = Processes()
        stack.callback(procs.close)
        controller = start_controller(procs, fleet)
        workers = start_hosts(procs, fleet, args.hosts, args.workers, containers=args.containers, ramp=args.ramp)
        registering = wait_registered(workers, args.hosts, timeout=120)
        time.sleep(args.warmup)
        samples_file = fleet["work"] / "controller.samples.json"
        for proc in [controller, *(p for p, _ in workers)]:
            proc.send_signal(signal.SIGUSR1)
        main0, cpu0, t1 = cpu_seconds(controller.pid, controller.pid), cpu_seconds(controller.pid), time.monotonic()
        time.sleep(args.seconds)
        main1, cpu1 = cpu_seconds(controller.pid, controller.pid), cpu_seconds(controller.pid)
        elapsed = time.monotonic() - t1
        for proc in [controller, *(p for p, _ in workers)]:
            proc.send_signal(signal.SIGUSR2)
        handled = _wait_for(samples_file, None)
        trips: list[float] = []
        registered = 0
        for _, status in workers:
            data = _wait_for(status, "round_trips")
            trips += data["round_trips"].get("Heartbeat", [])
            registered += data["registered"]
        heartbeats = handled.get("Heartbeat", [])
        result = {
            "hosts": args.hosts, "registered": registered, "workers": args.workers,
            "containers_per_host": args.containers, "seconds": round(elapsed, 1),
            "setup_seconds": round(setup, 1), "registration_seconds": round(registering, 1),
            "heartbeats_per_second": round(len(heartbeats) / elapsed, 1),
            "handling": percentiles(heartbeats), "round_trip": percentiles(trips),
            # controller/metrics.py's histogram (the servicer alone): the bucket bounds p50/p99 fall under
            "metrics_histogram_p50_le_ms": _ms(histogram_quantile(handled.get("histogram", {}), 0.50)),
            "metrics_histogram_p99_le_ms": _ms(histogram_quantile(handled.get("histogram", {}), 0.99)),
            "controller_cpu_percent": round(100 * (cpu1 - cpu0) / elapsed, 1),
            "controller_main_thread_cpu_percent": round(100 * (main1 - main0) / elapsed, 1),
            "machine_cpus": os.cpu_count(), "load_average": os.getloadavg(),
            "work_dir": str(work) if args.keep else None,
        }  # fmt: skip
        return result


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def report(r: dict) -> str:
    h, t = r["handling"], r["round_trip"]
    return "\n".join([
        f"hosts registered: {r['registered']}/{r['hosts']} ({r['workers']} processes, {r['containers_per_host']} "
        f"containers each; all registered in {r['registration_seconds']} s)",
        f"heartbeats handled: {r['heartbeats_per_second']}/s over {r['seconds']} s",
        f"handling (controller side): p50 {h['p50_ms']:.2f} ms, p99 {h['p99_ms']:.2f} ms, max {h['max_ms']:.1f} ms",
        f"  controller/metrics.py histogram: p50 <= {r['metrics_histogram_p50_le_ms']} ms, "
        f"p99 <= {r['metrics_histogram_p99_le_ms']} ms",
        f"round trip (agent side):    p50 {t['p50_ms']:.2f} ms, p99 {t['p99_ms']:.2f} ms, max {t['max_ms']:.1f} ms",
        f"controller CPU: {r['controller_cpu_percent']}% of one core, its event loop's thread "
        f"{r['controller_main_thread_cpu_percent']}% (machine: {r['machine_cpus']} CPUs, "
        f"load average {', '.join(f'{x:.2f}' for x in r['load_average'])})",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=4, help="processes running the simulated hosts")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured, after every host registered")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds between the last registration and the window")
    parser.add_argument("--containers", type=int, default=5, help="containers each host reports (the store knows them)")
    parser.add_argument("--ramp", type=float, default=20.0, help="seconds over which the hosts are started")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, store, certificates)")
    parser.add_argument("--serve-controller", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--status", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_controller:
        serve_controller(args.serve_controller, args.status)
        return
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else report(result))


if __name__ == "__main__":
    main()
