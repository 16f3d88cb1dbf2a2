"""Benchmark: rsync through the agent's transfer channel vs rsync over OpenSSH's sshd.

Brings up a two-host lab and, on host n2, runs both endpoints side by side:
(a) a TransferServer (this script with --serve) and (b) OpenSSH's sshd with a
temporary config. From host n1 it pushes the same tree to each, alternating,
a fresh destination directory every run (a full copy each time), aes128-gcm
for both. Both pushes use the same rsync options and the same ssh client
options (agent/transfer/client.py); only the endpoint differs. The channel
side is timed through `rsync_push` itself (temporary key files, progress and
statistics parsing included).

    python bench/rsync_channel.py [--runs 4] [--big-files 4 --big-mb 80 --small-files 8000 --small-kb 10]
                                  [--lab rsb] [--keep]
    python bench/rsync_channel.py --big-files 1 --big-mb 20 --small-files 500 --runs 2   # quick
    python bench/rsync_channel.py --dest-tmpfs 1536      # destinations in RAM: the channel itself

Prints medians and the throughput ratio channel/sshd (target >= 0.9) and writes
JSON to bench/results/. Traffic stays on the lab's own network (10.213.x.x).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TARGET = 0.9
CHANNEL_PORT = 7722
SSHD_PORT = 7723
OP_ID = "bench"


# -- on host n2: the channel endpoint ------------------------------------------------------


async def serve(args) -> int:
    from agent.transfer.grants import GrantRegistry
    from agent.transfer.server import TransferServer

    grants = GrantRegistry(Path(args.staging))
    server = TransferServer(args.listen, args.port, Path(args.host_key), grants)
    await server.start()
    grant = grants.authorize(OP_ID, Path(args.public_key_file).read_text().strip(), 3600)
    ready = {"address": server.address, "host_key": server.host_key, "user": grant.user,
             "staging": str(grant.staging)}  # fmt: skip
    tmp = Path(args.ready_file + ".tmp")
    tmp.write_text(json.dumps(ready))
    tmp.rename(args.ready_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    grants.revoke(OP_ID, remove_staging=True)
    await server.close()
    return 0


# -- on host n1: the pushes ------------------------------------------------------------------


async def push(args) -> int:
    from agent.transfer.client import PushTarget, credential_files, rsync_argv, rsync_push, ssh_argv

    spec = json.loads(Path(args.spec).read_text())
    src = Path(spec["src"])
    channel = PushTarget(spec["channel"]["address"], spec["channel"]["user"], spec["channel"]["host_key"],
                         Path(spec["channel"]["private_key_file"]).read_text())  # fmt: skip
    sshd = PushTarget(spec["sshd"]["address"], "root", spec["sshd"]["host_key"],
                      Path(spec["sshd"]["private_key_file"]).read_text())  # fmt: skip

    async def via_channel(run: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        stats = await rsync_push(src, channel, f"run{run}", timeout=1800)
        return time.perf_counter() - t0, stats.total_size

    async def via_sshd(run: int) -> tuple[float, int]:
        host, port = spec["sshd"]["address"].rsplit(":", 1)
        t0 = time.perf_counter()
        with credential_files(sshd) as (key, known_hosts):
            e = " ".join(shlex.quote(a) for a in ssh_argv(key, known_hosts, int(port)))
            argv = rsync_argv("rsync", src, f"root@{host}:{spec['sshd']['dest']}/run{run}/", e)
            proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.PIPE)  # fmt: skip
            out, err = await proc.communicate()
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"rsync to sshd failed ({proc.returncode}): {err.decode()[-2000:]}")
        size = next(int(line.split(":")[1].split()[0].replace(",", ""))
                    for line in out.decode().splitlines() if line.startswith("Total file size"))  # fmt: skip
        return elapsed, size

    def settle(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)
        os.sync()  # write-back of the previous run must not land in the next one's timing

    samples: dict[str, list[float]] = {"channel": [], "sshd": []}
    sizes = set()
    # Warm-up: one small-effect push each way (page cache of the source, ssh handshakes).
    for name, fn, dest in (("channel", via_channel, Path(spec["channel"]["staging"])),
                           ("sshd", via_sshd, Path(spec["sshd"]["dest"]))):  # fmt: skip
        await fn(0)
        settle(dest / "run0")
    for run in range(1, args.runs + 1):
        order = [("channel", via_channel, Path(spec["channel"]["staging"])),
                 ("sshd", via_sshd, Path(spec["sshd"]["dest"]))]  # fmt: skip
        for name, fn, dest in order if run % 2 else reversed(order):
            elapsed, size = await fn(run)
            samples[name].append(elapsed)
            sizes.add(size)
            settle(dest / f"run{run}")
    print(json.dumps({"samples_s": samples, "total_size": max(sizes)}))
    return 0


# -- outside: lab, tree, endpoints ---------------------------------------------------------------


def build_tree(root: Path, big_files: int, big_mb: int, small_files: int, small_kb: int) -> int:
    root.mkdir(parents=True)
    total = 0
    for i in range(big_files):
        with open(root / f"big{i}.bin", "wb") as f:
            for _ in range(big_mb):
                f.write(os.urandom(1024 * 1024))
        total += big_mb * 1024 * 1024
    per_dir = 500
    chunk = os.urandom(small_kb * 1024 + 4096)
    for i in range(small_files):
        d = root / "small" / f"d{i // per_dir:03d}"
        if i % per_dir == 0:
            d.mkdir(parents=True)
        # Different content per file (rsync does not dedupe, but keep it honest).
        (d / f"f{i:05d}").write_bytes(chunk[i % 4096 : i % 4096 + small_kb * 1024])
        total += small_kb * 1024
    return total


async def ensure_sshd() -> None:
    from corral import proc

    if (await proc.run(["dpkg", "-s", "openssh-server"], timeout=30, check=False)).returncode == 0:
        return
    print("installing openssh-server (the baseline's sshd) ...", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    await proc.run(["apt-get", "install", "-y", "openssh-server"], timeout=600, env=env)


def write_sshd_config(work: Path, listen: str) -> Path:
    from agent.transfer.keys import new_operation_keypair

    host_private, host_public = new_operation_keypair("bench-sshd-host")
    client_private, client_public = new_operation_keypair("bench-sshd-client")
    d = work / "sshd"
    d.mkdir(mode=0o700)
    for name, text, mode in (("host_key", host_private, 0o600), ("host_key.pub", host_public + "\n", 0o644),
                             ("client_key", client_private, 0o600),
                             ("authorized_keys", client_public + "\n", 0o600)):  # fmt: skip
        (d / name).write_text(text)
        (d / name).chmod(mode)
    config = d / "sshd_config"
    config.write_text(
        f"Port {SSHD_PORT}\nListenAddress {listen}\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nCiphers aes128-gcm@openssh.com,chacha20-poly1305@openssh.com\n"
        "X11Forwarding no\nAllowTcpForwarding no\nAllowAgentForwarding no\nPermitTTY no\n"
        "PrintMotd no\nUseDNS no\nStrictModes no\n"
    )
    return config


async def wait_for(path: Path, proc: asyncio.subprocess.Process, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.returncode is not None:
            raise SystemExit(f"{what} exited ({proc.returncode}) before it was ready")
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} not ready after {timeout:g} s")
        await asyncio.sleep(0.1)


async def wait_listening(lab: str, node: str, address: str, port: int, timeout: float = 30) -> None:
    import lab as corral_lab
    from corral import proc

    probe = corral_lab.host_command(lab, node, [
        sys.executable, "-c",
        f"import socket; socket.create_connection(({address!r}, {port}), timeout=1).close()",
    ])  # fmt: skip
    deadline = time.monotonic() + timeout
    while (await proc.run(probe, timeout=10, check=False)).returncode != 0:
        if time.monotonic() > deadline:
            raise SystemExit(f"nothing listens on {address}:{port} after {timeout:g} s")
        await asyncio.sleep(0.2)


async def stop(proc: asyncio.subprocess.Process | None) -> None:
    if proc is None or proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(10):
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def outer(args) -> int:
    from agent.transfer.keys import new_operation_keypair
    import lab as corral_lab

    from corral import proc

    await ensure_sshd()
    await corral_lab.lab_down(args.lab)  # leftovers of an interrupted run
    dest_root = None
    if args.dest_tmpfs:
        # Mounted before the lab's hosts make their mount namespaces, so they see it too.
        dest_root = Path(f"/var/tmp/corral-bench-rsync-{os.getpid()}")
        dest_root.mkdir(mode=0o700)
        await proc.run(["mount", "-t", "tmpfs", "-o", f"size={args.dest_tmpfs}m,mode=0700", "tmpfs",
                        str(dest_root)], timeout=30)  # fmt: skip
    info = None
    server = sshd = None
    try:
        info = await corral_lab.lab_up(name=args.lab, nodes=2)
        n1, n2 = info.hosts[0], info.hosts[1]
        work = info.base_dir / "bench-rsync"
        dests = dest_root or work
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        t0 = time.perf_counter()
        size = await asyncio.to_thread(build_tree, work / "src", args.big_files, args.big_mb,
                                       args.small_files, args.small_kb)  # fmt: skip
        os.sync()
        print(f"tree: {size / 1e6:.0f} MB in {args.big_files} + {args.small_files} files "
              f"(built in {time.perf_counter() - t0:.1f} s)", file=sys.stderr)  # fmt: skip

        private, public = new_operation_keypair("bench-op")
        (work / "op_key").write_text(private)
        (work / "op_key").chmod(0o600)
        (work / "op_key.pub").write_text(public + "\n")
        ready = work / "channel.json"
        server = await asyncio.create_subprocess_exec(*corral_lab.host_command(args.lab, n2.node, [
            sys.executable, str(Path(__file__).resolve()), "--serve", "--listen", n2.address,
            "--port", str(CHANNEL_PORT), "--staging", str(dests / "staging"),
            "--host-key", str(work / "channel_host_key"), "--public-key-file", str(work / "op_key.pub"),
            "--ready-file", str(ready),
        ]), stdout=open(work / "channel.log", "wb"), stderr=subprocess.STDOUT)  # fmt: skip
        await wait_for(ready, server, "the channel endpoint")
        channel = json.loads(ready.read_text())

        config = write_sshd_config(work, n2.address)
        (dests / "sshd-dest").mkdir()
        await corral_lab_run(args.lab, n2.node, ["mkdir", "-p", "/run/sshd"])
        sshd = await asyncio.create_subprocess_exec(*corral_lab.host_command(args.lab, n2.node, [
            "/usr/sbin/sshd", "-D", "-e", "-f", str(config),
        ]), stdout=open(work / "sshd.log", "wb"), stderr=subprocess.STDOUT)  # fmt: skip
        await wait_listening(args.lab, n1.node, n2.address, SSHD_PORT)

        spec = work / "spec.json"
        spec.write_text(json.dumps({
            "src": str(work / "src"),
            "channel": {**channel, "private_key_file": str(work / "op_key")},
            "sshd": {"address": f"{n2.address}:{SSHD_PORT}",
                     "host_key": (config.parent / "host_key.pub").read_text().strip(),
                     "private_key_file": str(config.parent / "client_key"), "dest": str(dests / "sshd-dest")},
        }))  # fmt: skip
        argv = corral_lab.host_command(args.lab, n1.node, [
            sys.executable, str(Path(__file__).resolve()), "--push", "--spec", str(spec), "--runs", str(args.runs),
        ])  # fmt: skip
        done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            print(done.stderr[-4000:], file=sys.stderr)
            return 1
        measured = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        await stop(server)
        await stop(sshd)
        if not args.keep:
            if info is not None:
                shutil.rmtree(info.base_dir / "bench-rsync", ignore_errors=True)
            await corral_lab.lab_down(args.lab)
        if dest_root is not None:
            if (await proc.run(["umount", str(dest_root)], timeout=30, check=False)).returncode != 0:
                await proc.run(["umount", "-l", str(dest_root)], timeout=30, check=False)
            dest_root.rmdir()

    samples = measured["samples_s"]
    total = measured["total_size"]
    med = {k: statistics.median(v) for k, v in samples.items()}
    result = {
        "tree": {"bytes": total, "big_files": args.big_files, "big_mb": args.big_mb,
                 "small_files": args.small_files, "small_kb": args.small_kb},
        "runs": args.runs, "cipher": "aes128-gcm@openssh.com",
        "destination": f"tmpfs ({args.dest_tmpfs} MiB)" if args.dest_tmpfs else "lab directory (disk)",
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "median_MBps": {k: round(total / v / 1e6, 1) for k, v in med.items()},
        "ratio_throughput_channel_vs_sshd": round(med["sshd"] / med["channel"], 3),
        "target_ratio": TARGET,
    }  # fmt: skip
    ok = result["ratio_throughput_channel_vs_sshd"] >= TARGET
    print(f"tree {total / 1e6:.0f} MB, {args.runs} runs each, alternating, aes128-gcm, n1 -> n2, "
          f"destination on {result['destination']}")
    for k in ("channel", "sshd"):
        runs = ", ".join(f"{s:.2f}" for s in samples[k])
        print(f"  {k:8s} median {med[k]:.2f} s ({total / med[k] / 1e6:.0f} MB/s)   runs: {runs}")
    print(f"  throughput ratio channel/sshd {result['ratio_throughput_channel_vs_sshd']:.2f} "
          f"(target >= {TARGET}) {'OK' if ok else 'BELOW TARGET'}")  # fmt: skip
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out_dir / f"rsync_channel-{stamp}.json").write_text(json.dumps({"result": result, "samples_s": samples}, indent=2))
    return 0


async def corral_lab_run(lab: str, node: str, argv: list[str]) -> None:
    import lab as corral_lab
    from corral import proc

    await proc.run(corral_lab.host_command(lab, node, argv), timeout=30)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=4, help="timed pushes per endpoint (after one warm-up each)")
    p.add_argument("--big-files", type=int, default=4)
    p.add_argument("--big-mb", type=int, default=80)
    p.add_argument("--small-files", type=int, default=8000)
    p.add_argument("--small-kb", type=int, default=10)
    p.add_argument("--lab", default="rsb")
    p.add_argument("--keep", action="store_true", help="leave the lab and the work directory")
    p.add_argument("--dest-tmpfs", type=int, metavar="MIB", default=0,
                   help="receive into a tmpfs of this size (takes the destination disk out of the measurement)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--push", action="store_true", help=argparse.SUPPRESS)
    for opt in ("--listen", "--staging", "--host-key", "--public-key-file", "--ready-file", "--spec"):
        p.add_argument(opt, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        return asyncio.run(serve(args))
    if args.push:
        return asyncio.run(push(args))
    return asyncio.run(outer(args))


if __name__ == "__main__":
    sys.exit(main())
