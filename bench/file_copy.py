"""Benchmark: `corral ct file push|pull` against raw `lxc-attach` on the container's host.

Brings up a one-host lab (or uses `--lab NAME` if it is up) and a busybox container, then
copies a file of `--size` MiB in and out, `-n` times, interleaving:
- corral: the CLI, through the controller and the agent (mTLS gRPC both hops, 1 MiB pieces);
- raw: `lxc-attach -- sh -c 'cat > F'` (and `cat F`) run in the lab host's namespaces, the
  floor of any copy into a running container that goes through its own view of the files.

    python bench/file_copy.py [--size 256] [-n 5] [--lab fcp] [--keep]

Prints median MB/s of each and the ratio corral/raw, and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CORRAL = Path(sys.executable).parent / "corral"
NAME = "bench-files"


async def _run(argv: list[str], stdin=None, stdout=None, check: bool = True) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=stdin or asyncio.subprocess.DEVNULL,
                                                stdout=stdout or asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)  # fmt: skip
    _, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:6])}... exited {proc.returncode}: {err.decode().strip()}")


async def _timed(argv: list[str], *, src: Path | None = None, dst: Path | None = None) -> float:
    with open(src or os.devnull, "rb") as fin, open(dst or os.devnull, "wb") as fout:
        began = time.perf_counter()
        await _run(argv, stdin=fin if src else None, stdout=fout if dst else None)
        return time.perf_counter() - began


async def main(args) -> dict:
    import lab as corral_lab

    info = await corral_lab.lab_status(args.lab)
    started = info is None
    if started:
        info = await corral_lab.lab_up(name=args.lab, nodes=1)
    host = info.hosts[0]
    cli = [str(CORRAL), "--config", str(info.cli_config)]
    raw_attach = ["nsenter", "-t", str(host.agent_pid), "-n", "-m",
                  "lxc-attach", "-P", str(host.lxc_path), "-n", NAME, "--clear-env", "--"]  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="corral-bench-files-"))
    src, back = work / "src.bin", work / "back.bin"
    with open(src, "wb") as f:
        for _ in range(args.size):
            f.write(os.urandom(1 << 20))
    size = src.stat().st_size
    await _run([*cli, "ct", "destroy", "--force", NAME], check=False)  # left by an interrupted run
    await _run([*cli, "ct", "create", NAME, "-t", "busybox", "--start"])
    times: dict[str, list[float]] = {"corral_push": [], "raw_push": [], "corral_pull": [], "raw_pull": []}
    try:
        for _ in range(args.n):
            times["corral_push"].append(await _timed([*cli, "ct", "file", "push", NAME, str(src), "/root/c.bin"]))
            times["raw_push"].append(await _timed([*raw_attach, "sh", "-c", "cat > /root/r.bin"], src=src))
            times["corral_pull"].append(await _timed([*cli, "ct", "file", "pull", NAME, "/root/c.bin", str(back)]))
            back.unlink()
            times["raw_pull"].append(await _timed([*raw_attach, "cat", "/root/r.bin"], dst=back))
        if hashlib.sha256(back.read_bytes()).digest() != hashlib.sha256(src.read_bytes()).digest():
            raise SystemExit("the file pulled back differs from the one pushed")
    finally:
        await _run([*cli, "ct", "destroy", "--force", NAME], check=False)
        for f in work.iterdir():
            f.unlink()
        work.rmdir()
        if started and not args.keep:
            await corral_lab.lab_down(args.lab)
    mbps = {k: size / statistics.median(v) / 1e6 for k, v in times.items()}
    result = {
        "size_bytes": size, "runs": args.n, "seconds": times,
        "median_mb_per_s": {k: round(v, 1) for k, v in mbps.items()},
        "ratio_corral_to_raw": {op: round(mbps[f"corral_{op}"] / mbps[f"raw_{op}"], 2) for op in ("push", "pull")},
    }  # fmt: skip
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="MiB")
    parser.add_argument("-n", type=int, default=5)
    parser.add_argument("--lab", default="fcp")
    parser.add_argument("--keep", action="store_true", help="leave a lab this run brought up")
    args = parser.parse_args()
    result = asyncio.run(main(args))
    for op in ("push", "pull"):
        m = result["median_mb_per_s"]
        print(f"{op}: corral {m[f'corral_{op}']} MB/s, raw lxc-attach {m[f'raw_{op}']} MB/s, "
              f"ratio {result['ratio_corral_to_raw'][op]}")  # fmt: skip
    out = REPO / "bench" / "results" / f"file_copy-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written {out}")
