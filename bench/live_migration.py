"""Benchmark: every pause a live migration between two lab hosts makes the workload see,
beside the floors (issue 13).

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
  operation (preflight_pause, downtime, freeze, criu_frozen, transfer,
  criu_restore, ...);
- where both nodes offer post-copy (`live_strategies`), the lazy floor, then
  `migrate --live --postcopy` (its downtime and `pages_done`, the time until
  every page has moved).

The lazy floor is post-copy's counterpart of the floor: the same container, on
one lab host, dumped in lazy-pages mode and restored in lazy mode, with raw
tools. `lxc-checkpoint -D IMG -A SCRIPT` (CRIU_CONFIG_FILE: `lazy-pages`,
`address 127.0.0.1`, a free port, and CRIU's nftables network lock where it has
one, as the agent picks) serves the pages; `criu lazy-pages --page-server
--address 127.0.0.1 --port P -D IMG` pulls them; `lxc-checkpoint -r -d` with
`lazy-pages` restores a copy under a scratch LXC path (the original's config:
same name and `lxc.uts.name`, same rootfs, its log moved, no AppArmor keys on a
kernel without AppArmor). The original must outlive it, so it is dumped without
`-s` and frozen at CRIU's pre-dump stage by the action script the agent's own
post-copy source uses (Freezer.action_script): CRIU leaves it frozen when the
pages are all served. Timed from that freeze (the script stamps it) to the
copy running (restored, then thawed: it comes back frozen, as the agent's
restore finds it too), and to `criu lazy-pages` exiting (every page moved).
Then the copy is killed (`lxc-stop -k`), the original thawed and any network
lock left in its namespace lifted (the same init keeps running where the
fleet has it: checked, and the fleet must report it running again), and
whatever the copy left is removed (its cgroups, found by its own processes'
cgroups since other hosts and labs share the hierarchies; a new veth; the
scratch path). Caveats: the pages go over loopback without TLS, while the
product's post-copy pages cross hosts over TLS (a one-time certificate per
transfer), so the floor leaves out TLS and the network; no files are copied
(the images stay in one directory); the copy runs beside its frozen original
(same address and MAC on the bridge, the original's network quiet) for the
seconds the pages take.

Every pause per migration: the pre-flight's trial dump (`preflight_pause`; a
pre-flight that does not dump may report 0, and a missing key counts as not
reported, never as 0) plus the downtime, and their sum; medians per strategy
and size, beside the floors, in the table and in the JSON summary (`pauses`).
Verdicts (DESIGN.md targets), PASS, FAIL or not measured: stop-and-copy
downtime <= 1.2x the floor (1.5x at 1 GiB); cross-host CRIU restore
(stop-and-copy's `criu_restore`) <= 1.2x the floor's CRIU restore of the same
container; small: downtime < TARGET_SMALL_MS; at 1 GiB: pre-flight pause
<= 100 ms, post-copy downtime <= 1.2x the lazy floor and <= 500 ms (stretch),
with the time until every page has moved beside them.

Repetitions alternate the direction (n1->n2, n2->n1, ...) and, with post-copy,
which strategy goes first (each preceded by its floor). JSON goes to
bench/results/. Everything the run made (containers; the lab if it brought it
up) is removed, also on error or Ctrl-C.

    python bench/live_migration.py                      # quick: small container, 3 repetitions
    python bench/live_migration.py --sizes small,256M,1G -n 3

The memory workload (`--memory text`, the default) is busybox `awk` (no compiled
code): it holds SIZE in 60 KiB strings of varied bytes (real anonymous memory,
checked with VmRSS) and, fed ten ticks a second by a shell loop through a pipe,
rewrites rate/10 MB of them per tick. Both are started by the container's init,
so CRIU can dump them. Its strings repeat a 4 KiB seed, so its pages compress
~500x with zstd: the stop-and-copy stream compresses them (agent/transfer/file_stream.py).
`--memory random` measures the other end: busybox `dd` reads SIZE from
/dev/urandom into one buffer and stays blocked writing it to a pipe nobody reads
(incompressible memory, not dirtied).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
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
TARGET_RATIO_1G = 1.5  # the same at 1 GiB
TARGET_SMALL_MS = 300.0  # small container, freeze to running
TARGET_RESTORE_RATIO = 1.2  # stop-and-copy's CRIU restore (cross-host) vs the floor's (same images, one host)
TARGET_1G_PREFLIGHT_MS = 100.0  # the pre-flight's pause (trial dump) at 1 GiB
TARGET_POSTCOPY_RATIO = 1.2  # post-copy downtime at 1 GiB vs the lazy floor, same container, same run
TARGET_1G_POSTCOPY_MS = 500.0  # 1 GiB being dirtied, post-copy (stretch)
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

COUNTER_AND_RANDOM = """#!/bin/sh
# Started by init (so CRIU can dump it): a counter, and MB MiB of random bytes held by dd.
echo $$ > /tmp/workload.pid
if [ {mb} -gt 0 ]; then
    dd if=/dev/urandom bs={mb}M count=1 iflag=fullblock 2>/dev/null | sleep 2147483647 &
    echo 1 > /tmp/dirty.ready
fi
i=0
while :; do i=$((i+1)); echo $i > /tmp/counter; usleep 100000; done
"""
MEMORY_HOLDERS = {"text": "awk", "random": "dd"}  # --memory: the process holding it

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


# -- inside a lab host: the floors ------------------------------------------------------------


def _launch(argv: list[str], output: Path, criu_config: Path | None = None) -> subprocess.Popen:
    """Start a tool with its output to a file (a restored container keeps it open) and its
    own process group; `criu_config`: the CRIU config file it reads (CRIU_CONFIG_FILE)."""
    env = {k: v for k, v in os.environ.items() if k != "CRIU_CONFIG_FILE"}
    env["PATH"] = PATH
    if criu_config is not None:
        env["CRIU_CONFIG_FILE"] = str(criu_config)
    with open(output, "ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, cwd="/",
                                start_new_session=True)  # fmt: skip


def _kill_group(child: subprocess.Popen | None) -> None:
    if child is not None and child.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def _run_tool(argv: list[str], output: Path, timeout: float) -> tuple[int, float, subprocess.Popen]:
    """Run a tool (see _launch) with a deadline. Returns (exit code, wall ms, the process)."""
    t0 = time.perf_counter()
    child = _launch(argv, output)
    try:
        rc = child.wait(timeout)
    except subprocess.TimeoutExpired:
        _kill_group(child)
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
        with contextlib.suppress(OSError):
            images.parent.rmdir()  # if empty


def _wait_for(ready, child: subprocess.Popen, what: str, timeout: float, log: Path) -> None:
    """Poll `ready()` every 5 ms until it holds; fail if `child` exits first or the deadline passes."""
    deadline = time.perf_counter() + timeout
    while not ready():
        if child.poll() is not None:
            raise RuntimeError(f"{what}: exited {child.returncode} first: {_log_tail(log)}")
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{what}: not in {timeout:g} s: {_log_tail(log)}")
        time.sleep(0.005)


def _wait_exit(child: subprocess.Popen, what: str, timeout: float, log: Path) -> int:
    try:
        rc = child.wait(timeout)
    except subprocess.TimeoutExpired:
        _kill_group(child)
        raise RuntimeError(f"{what}: did not finish in {timeout:g} s (killed): {_log_tail(log)}") from None
    if rc != 0:
        raise RuntimeError(f"{what}: exited {rc}: {_log_tail(log)}")
    return rc


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def _init_pid(lxc_path: Path, name: str) -> int:
    out = subprocess.run(["lxc-info", "-P", str(lxc_path), "-n", name, "-p", "-H"], capture_output=True, text=True,
                         env={"PATH": PATH}, timeout=30)  # fmt: skip
    return int(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip().isdigit() else 0


def _state(lxc_path: Path, name: str) -> str:
    out = subprocess.run(["lxc-info", "-P", str(lxc_path), "-n", name, "-s", "-H"], capture_output=True, text=True,
                         env={"PATH": PATH}, timeout=30)  # fmt: skip
    return out.stdout.strip() if out.returncode == 0 else f"unknown ({out.stderr.strip()[-200:]})"


def _links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def _cgroup_names(*pids: int) -> set[str]:
    """The top cgroup directories (lxc.payload.NAME-N, lxc.monitor.NAME-N) these processes are in:
    the copy's own, told apart from those of a container of the same name elsewhere on the machine
    (the lab hosts, and other labs, share the hierarchies)."""
    names = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
                top = line.split(":", 2)[2].strip("/").split("/")[0]
                if top.startswith("lxc."):
                    names.add(top)
    return names


def _rss_kib(root: int) -> int:
    """VmRSS of `root` and every process below it, KiB."""
    from agent.runtime.tool_process import descendants

    total = 0
    for pid in [root, *descendants(root)]:
        with contextlib.suppress(OSError, ValueError, IndexError):
            line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS"))
            total += int(line.split()[1])
    return total


def inner_lazy_floor(args) -> dict:
    """Post-copy's floor on this host: NAME (in LXC path P) dumped in lazy-pages mode, serving
    its pages from a page server on 127.0.0.1 (no TLS), and restored in lazy mode as a copy
    under a scratch LXC path (same name, same rootfs), `criu lazy-pages` pulling the pages.
    The original is kept: dumped without -s and frozen (by the action script the agent's own
    post-copy source uses, at CRIU's pre-dump stage), so when the copy has every page it is
    killed and the original thawed, running on as the fleet believes. Nothing of the copy is
    left (its cgroups, its veth, the scratch path)."""
    from agent.runtime.cgroups import container_cgroup_dirs, remove_empty
    from agent.runtime.tcp_listen import listening as _listening  # the agent's own: connecting would take the page server
    from agent.runtime.criu_pagemap import lazy_bytes
    from agent.runtime.criu_stats import StatsFormatError, read_restore_stats
    from agent.runtime.freezer import PREFROZEN_MARK, Freezer, read_frozen_at, remove_network_lock

    lxc_path, name, work = Path(args.lxc_path), args.name, Path(args.images)
    images, scratch = work / "images", work / "lxc"
    pid = _init_pid(lxc_path, name)
    freezer = Freezer.of(pid) if pid else None
    if freezer is None:
        raise RuntimeError(f"{name}: no init pid ({pid}) or no freezer cgroup: cannot keep the original")
    # CRIU's network lock as the agent picks it (LiveSupport.network_lock): nftables where CRIU has it.
    nft = subprocess.run(["criu", "check", "--feature", "network_lock_nftables"], capture_output=True,
                         env={"PATH": PATH}, timeout=60).returncode == 0  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    images.mkdir(parents=True, mode=0o700)
    (scratch / name).mkdir(parents=True, mode=0o700)
    # The copy's config: the original's, its log in the scratch path, and (as the agent's restore
    # does on a kernel without AppArmor, which CRIU refuses) without the AppArmor keys.
    no_apparmor = not Path("/sys/kernel/security/apparmor").exists()
    lines = []
    for line in (lxc_path / name / "config").read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if key == "lxc.log.file":
            line = f"lxc.log.file = {work / 'copy-lxc.log'}"
        elif no_apparmor and key.startswith("lxc.apparmor."):
            continue
        lines.append(line)
    (scratch / name / "config").write_text("\n".join(lines) + "\n")

    script = work / "freeze.sh"
    script.write_text(freezer.action_script(images))
    script.chmod(0o700)
    address, port = "127.0.0.1", _free_port("127.0.0.1")
    dump_conf, restore_conf = work / "dump.conf", work / "restore.conf"
    dump_conf.write_text(f"lazy-pages\naddress {address}\nport {port}\n" + ("network-lock nftables\n" if nft else ""))
    restore_conf.write_text("lazy-pages\n")
    links_before, original_cgroups = _links(), _cgroup_names(pid)
    cgroups_before = set(container_cgroup_dirs(name))
    dump = pages = restore = None
    copy_started, copy_cgroups = False, set()
    result: dict = {}
    try:
        t0 = time.time()
        dump = _launch(["lxc-checkpoint", "-P", str(lxc_path), "-n", name, "-D", str(images), "-A", str(script)],
                       work / "lxc-checkpoint.out", dump_conf)  # fmt: skip
        _wait_for(lambda: _listening(port), dump, "lazy dump (page server listening)", 120, images / "dump.log")
        t_serving = time.time()
        pages = _launch(["criu", "lazy-pages", "--page-server", "--address", address, "--port", str(port),
                         "-D", str(images), "-o", "lazy-pages.log"], work / "lazy-pages.out")  # fmt: skip
        _wait_for((images / "lazy-pages.socket").exists, pages, "criu lazy-pages (socket)", 30,
                  images / "lazy-pages.log")  # fmt: skip
        t_restore = time.time()
        copy_started = True
        restore = _launch(["lxc-checkpoint", "-P", str(scratch), "-n", name, "-D", str(images), "-r", "-d"],
                          work / "lxc-restore.out", restore_conf)  # fmt: skip
        # A failed lazy restore can hang in criu restore: watch criu lazy-pages beside it.
        _wait_for(lambda: restore.poll() is not None, pages, "lazy restore", 300, images / "lazy-pages.log")
        if restore.returncode != 0:
            raise RuntimeError(f"lazy restore (lxc-checkpoint -r) exited {restore.returncode}: "
                               f"{_log_tail(images / 'restore.log')}")  # fmt: skip
        monitor, copy_init = restored_monitor(restore.pid)
        copy_cgroups = _cgroup_names(*(p for p in (monitor, copy_init) if p)) - original_cgroups
        if not copy_init or copy_init == pid or not copy_cgroups:
            raise RuntimeError(f"restored copy of {name}: init {copy_init} (the original's {pid}), "
                               f"cgroups {sorted(copy_cgroups)}: not told apart from the original")  # fmt: skip
        if (images / PREFROZEN_MARK).exists():  # restored frozen, as it was dumped: thaw it (the agent does)
            copy_freezer = Freezer.of(copy_init) if copy_init else None
            if copy_freezer is None:
                raise RuntimeError(f"restored copy of {name} (init {copy_init}): its freezer cgroup not found")
            copy_freezer.thaw()
        t_running = time.time()
        _wait_exit(pages, "criu lazy-pages (every page moved)", 600, images / "lazy-pages.log")
        t_pages = time.time()
        _wait_exit(dump, "lazy dump (lxc-checkpoint)", 60, images / "dump.log")
        t_dump_done = time.time()
        copy_state, copy_rss = _state(scratch, name), _rss_kib(copy_init)
        if copy_state != "RUNNING":
            raise RuntimeError(f"the restored copy of {name} is {copy_state} once every page moved")
        frozen_at = read_frozen_at(images)
        if frozen_at is None or not (images / PREFROZEN_MARK).exists():
            raise RuntimeError(f"{name}: the freeze script did not freeze it (CRIU froze it itself): no floor")
        try:
            criu_restore = read_restore_stats(images).restore_us / 1000
        except (OSError, StatsFormatError):
            criu_restore = None
        result = {
            "downtime": (t_running - frozen_at) * 1000,  # freeze to the copy running (thawed)
            "pages_done": (t_pages - frozen_at) * 1000,  # freeze to criu lazy-pages' exit
            "span": (t_running - t0) * 1000,  # launch of the dump to the copy running
            "freeze_after_launch": (frozen_at - t0) * 1000,  # LXC's and CRIU's start-up, outside the pause
            "images_ready": (t_serving - frozen_at) * 1000,  # freeze to the page server listening
            "lazy_pages_ready": (t_restore - t_serving) * 1000,  # criu lazy-pages start to its socket
            "restore_wall": (t_running - t_restore) * 1000,  # lxc-checkpoint -r -d, and the thaw
            "criu_restore": criu_restore,
            "dump_exit": (t_dump_done - frozen_at) * 1000,
            "lazy_bytes": lazy_bytes(images),
            "images_bytes": sum(f.stat().st_size for f in images.glob("*.img")),
            "copy_monitor_found": bool(monitor),
            "copy_rss_kib": copy_rss,  # the copy's memory once every page moved (its workload's size)
            "network_lock": "nftables" if nft else "iptables",
        }
        return result
    finally:
        _kill_group(restore)
        _kill_group(pages)
        if copy_started:
            subprocess.run(["lxc-stop", "-P", str(scratch), "-n", name, "-k"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env={"PATH": PATH}, timeout=60)  # fmt: skip
        if dump is not None and dump.poll() is None:
            freezer.freeze()  # while serving, CRIU holds the tasks in a thawed cgroup: freeze before the kill
            _kill_group(dump)
        # The original runs on (the copy is gone): thaw it, lift any network lock left in its namespace.
        freezer.thaw()
        asyncio.run(remove_network_lock(pid))
        tables = subprocess.run(["nsenter", "-t", str(pid), "-n", "nft", "list", "tables"], capture_output=True,
                                text=True, env={"PATH": PATH}, timeout=30).stdout.split("\n")  # fmt: skip
        locks = [t.strip() for t in tables if t.split()[-1:] and t.split()[-1].startswith(("CRIU", "corral-lock"))]
        leftovers = []
        if copy_cgroups:
            made = sorted(p for p in container_cgroup_dirs(name) if p.name in copy_cgroups)
        else:  # a restore that failed before its copy could be found: the empty cgroups LXC made for it
            made = sorted(p for p in set(container_cgroup_dirs(name)) - cgroups_before
                          if p.name not in original_cgroups)  # fmt: skip
        removed = remove_empty(made)
        leftovers += [f"cgroup {p} (removed)" for p in removed]
        leftovers += [f"cgroup {p} (NOT EMPTY, left)" for p in made if p not in removed]
        for link in sorted(_links() - links_before):
            subprocess.run(["ip", "link", "del", link], stderr=subprocess.DEVNULL, env={"PATH": PATH}, timeout=30)
            leftovers.append(f"link {link} (removed)")
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):
            work.parent.rmdir()  # if empty
        if leftovers:
            print(f"lazy floor: the copy of {name} left: {'; '.join(leftovers)}", file=sys.stderr)
        result["copy_leftovers"] = leftovers
        result["original_state"] = _state(lxc_path, name)
        result["original_init_kept"] = _init_pid(lxc_path, name) == pid
        result["original_network_locks"] = locks


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
        script = COUNTER_AND_RANDOM if self.args.memory == "random" else COUNTER_AND_DIRTIER
        workload = script.format(mb=size.mb, rate=self.args.rate)
        holder = MEMORY_HOLDERS[self.args.memory]
        await self.exec_ok(name, ["sh", "-c", "cat > /etc/dirty.awk"], DIRTY_AWK.encode())
        await self.exec_ok(name, ["sh", "-c", "cat > /etc/init.d/workload.new && chmod +x /etc/init.d/workload.new"
                                  " && mv /etc/init.d/workload.new /etc/init.d/workload"], workload.encode())  # fmt: skip
        await self.exec_ok(name, ["sh", "-c", "kill $(pidof sleep)"])  # init respawns the workload
        deadline = time.monotonic() + 60 + size.mb / 20
        rss_kib = 0
        while True:
            probe = await self.fleet.exec(name, ["sh", "-c",
                f"cat /tmp/counter; [ -s /tmp/dirty.ready ] && grep VmRSS /proc/$(pidof {holder})/status || true"])  # fmt: skip
            lines = probe.stdout.decode().split("\n")
            counter = int(lines[0]) if lines and lines[0].strip().isdigit() else 0
            rss_kib = int(lines[1].split()[1]) if len(lines) > 1 and lines[1].startswith("VmRSS") else 0
            if counter > 3 and (size.mb == 0 or rss_kib >= size.mb * 1024 * 0.95):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: workload not ready (counter {counter}, {holder} VmRSS {rss_kib} KiB)")
            await asyncio.sleep(0.5)
        self.log(f"{name}: workload running" + (f", {holder} VmRSS {rss_kib / 1024:.0f} MiB" if size.mb else ""))
        return {"awk_vmrss_kib": rss_kib}

    async def floor(self, name: str, node: str, lazy: bool = False) -> dict:
        """The stop-and-copy floor (inner_floor) or, `lazy`, post-copy's (inner_lazy_floor), run
        inside lab host `node`; returns once the fleet has the container running there again."""
        import lab as corral_lab

        host = self.info.host(node)
        mode, scratch = ("--inner-lazy-floor", "bench-lazy-floor") if lazy else ("--inner-floor", "bench-floor")
        argv = corral_lab.host_command(self.info.name, node, [
            sys.executable, str(Path(__file__).resolve()), mode, "--lxc-path", str(host.lxc_path),
            "--name", name, "--images", str(host.state_dir / scratch / name),
        ])  # fmt: skip
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(900):
            out, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{'lazy ' if lazy else ''}floor on {node} failed: {err.decode().strip()[-800:]}")
        sample = json.loads(out)
        if sample.get("copy_leftovers"):
            self.log(f"{name}: lazy floor's copy left: {'; '.join(sample['copy_leftovers'])}")
        if lazy and (not sample.get("original_init_kept") or sample.get("original_state") != "RUNNING"
                     or sample.get("original_network_locks")):  # fmt: skip
            raise RuntimeError(f"lazy floor on {node}: the original {name} is {sample.get('original_state')}, "
                               f"same init: {sample.get('original_init_kept')}, "
                               f"network locks left: {sample.get('original_network_locks')}")  # fmt: skip
        await self.wait_running(name, node)
        return sample

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
                    "floor": [], "lazy_floor": [], STOP_AND_COPY: [], POST_COPY: []})  # fmt: skip
        out.update(await self.prepare(size))
        here, there = LAB_NODES
        for rep in range(self.args.n):
            order = strategies if rep % 2 == 0 else list(reversed(strategies))
            for strategy in order:
                # Its floor first, on the host the container is on, the same repetition.
                await asyncio.sleep(SETTLE_S)
                if strategy == STOP_AND_COPY:
                    sample = await self.floor(name, here)
                    sample["node"] = here
                    out["floor"].append(sample)
                    self.log(f"{name} rep {rep + 1}: floor on {here}: freeze-to-running {sample['downtime']:.0f} ms, "
                             f"span {sample['span']:.0f} ms (dump {sample['dump_wall']:.0f}, restore {sample['restore_wall']:.0f})")  # fmt: skip
                else:
                    sample = await self.floor(name, here, lazy=True)
                    sample["node"] = here
                    out["lazy_floor"].append(sample)
                    self.log(f"{name} rep {rep + 1}: lazy floor on {here}: freeze-to-running {sample['downtime']:.0f} ms, "
                             f"all pages {sample['pages_done']:.0f} ms (images ready {sample['images_ready']:.0f}, "
                             f"restore {sample['restore_wall']:.0f}, lazy {sample['lazy_bytes'] / 1e6:.1f} MB)")  # fmt: skip
                await asyncio.sleep(SETTLE_S)
                sample = await self.migrate(name, there, strategy)
                sample["from"], sample["to"] = here, there
                sample["pauses"] = pauses(sample["timings"])
                out[strategy].append(sample)
                t, pz = sample["timings"], sample["pauses"]
                self.log(f"{name} rep {rep + 1}: {strategy} {here}->{there}: pre-flight {_ms(pz['preflight'])} + "
                         f"downtime {_ms(pz['downtime'])} = pauses {_ms(pz['total'])}; "
                         + ", ".join(_fmt(k, v) for k, v in sorted(t.items()) if k not in ("downtime", "preflight_pause")))  # fmt: skip
                here, there = there, here
        await self.fleet.destroy_container(name, force=True)


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 1) if values else None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def pauses(timings: dict) -> dict:
    """Every pause one migration made the workload see: the pre-flight's trial dump
    (`preflight_pause`; a missing key is 'not reported', None, never 0) and the downtime;
    `total` only when both were reported."""
    pre, down = timings.get("preflight_pause"), timings.get("downtime")
    return {"preflight": pre, "downtime": down, "total": None if pre is None or down is None else pre + down}


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


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def is_1g(s: dict) -> bool:
    return s.get("memory_mib", 0) >= 1024


def summarize(run: dict) -> dict:
    s: dict = {"size": run["size"], "memory_mib": run.get("memory_mib", 0)}
    if run.get("error"):
        s["incomplete"] = run["error"]
    floors, lazy_floors = run["floor"], run.get("lazy_floor", [])
    s["floor_downtime_ms"] = _median([f["downtime"] for f in floors])
    s["floor_span_ms"] = _median([f["span"] for f in floors])
    for key in ("dump_wall", "restore_wall", "criu_freezing", "criu_frozen", "criu_restore"):
        s[f"floor_{key}_ms"] = _median([f[key] for f in floors])
    if lazy_floors:
        s["lazy_floor_n"] = len(lazy_floors)
        for key in ("downtime", "pages_done", "span", "images_ready", "lazy_pages_ready", "restore_wall",
                    "criu_restore", "freeze_after_launch"):  # fmt: skip
            s[f"lazy_floor_{key}_ms"] = _median([f.get(key) for f in lazy_floors])
        s["lazy_floor_lazy_bytes"] = _median([f.get("lazy_bytes") for f in lazy_floors])
        s["lazy_floor_leftovers"] = sorted({x for f in lazy_floors for x in f.get("copy_leftovers", [])})
    # Every pause the workload sees, per strategy: medians of each, and of their sum per migration.
    s["pauses"] = {"floor": {"total_ms": s["floor_downtime_ms"], "n": len(floors)}}
    if lazy_floors:
        s["pauses"]["lazy_floor"] = {"total_ms": s["lazy_floor_downtime_ms"], "n": len(lazy_floors)}
    for strategy in (STOP_AND_COPY, POST_COPY):
        samples = run[strategy]
        if not samples:
            continue
        keys = sorted({k for smp in samples for k in smp["timings"]})
        s[strategy] = {k: _median([smp["timings"].get(k) for smp in samples]) for k in keys}
        s[strategy]["n"] = len(samples)
        s[strategy]["directions"] = [f"{smp['from']}->{smp['to']}" for smp in samples]
        pz = [smp.get("pauses") or pauses(smp["timings"]) for smp in samples]
        s["pauses"][strategy] = {
            "preflight_ms": _median([p["preflight"] for p in pz]),
            "downtime_ms": _median([p["downtime"] for p in pz]),
            "total_ms": _median([p["total"] for p in pz]),
            "preflight_reported": sum(p["preflight"] is not None for p in pz),
            "n": len(pz),
        }
    sc, pc = s.get(STOP_AND_COPY, {}), s.get(POST_COPY, {})
    if sc.get("downtime") and s["floor_downtime_ms"]:
        s["ratio_stop_and_copy_vs_floor"] = _ratio(sc["downtime"], s["floor_downtime_ms"])
        s["ratio_stop_and_copy_vs_floor_span"] = _ratio(sc["downtime"], s["floor_span_ms"])
    if sc.get("criu_restore") is not None and s["floor_criu_restore_ms"]:
        s["ratio_criu_restore_cross_vs_local"] = _ratio(sc["criu_restore"], s["floor_criu_restore_ms"])
    if pc:
        s["postcopy_pages_key"] = _pages_key(pc)
        if pc.get("downtime") and s.get("lazy_floor_downtime_ms"):
            s["ratio_postcopy_vs_lazy_floor"] = _ratio(pc["downtime"], s["lazy_floor_downtime_ms"])
    return s


def verdicts(summaries: list[dict], strategies: list[str], postcopy_note: str = "") -> list[dict]:
    """One line per target (DESIGN.md): pass True/False, or None when not measured (with why)."""
    out = []

    def check(target: str, value: float | None, limit: float, note: str = "", strict: bool = False) -> None:
        ok = None if value is None else (value < limit if strict else value <= limit)
        out.append({"target": target, "value": value, "limit": limit, "pass": ok, "note": note})

    for s in summaries:
        size, big = s["size"], is_1g(s)
        sc, pc, pz = s.get(STOP_AND_COPY, {}), s.get(POST_COPY, {}), s.get("pauses", {})
        limit = TARGET_RATIO_1G if big else TARGET_RATIO
        check(f"{size}: stop-and-copy downtime <= {limit:g}x the floor", s.get("ratio_stop_and_copy_vs_floor"), limit,
              f"{_ms(sc.get('downtime'))} vs {_ms(s['floor_downtime_ms'])}")  # fmt: skip
        check(f"{size}: cross-host CRIU restore <= {TARGET_RESTORE_RATIO:g}x the local one",
              s.get("ratio_criu_restore_cross_vs_local"), TARGET_RESTORE_RATIO,
              f"stop-and-copy criu_restore {_ms(sc.get('criu_restore'))} vs the floor's {_ms(s['floor_criu_restore_ms'])}")  # fmt: skip
        if size == "small":
            for strategy in strategies:
                check(f"small: {strategy} downtime < {TARGET_SMALL_MS:g} ms", s.get(strategy, {}).get("downtime"),
                      TARGET_SMALL_MS, strict=True)  # fmt: skip
        if not big:
            continue
        for strategy in strategies:
            p = pz.get(strategy, {})
            got, n = p.get("preflight_reported", 0), p.get("n", 0)
            why = ("the operations reported no preflight_pause" if not got
                   else f"reported by {got} of {n} operations" if got < n else "")  # fmt: skip
            check(f"{size}: {strategy} pre-flight pause <= {TARGET_1G_PREFLIGHT_MS:g} ms", p.get("preflight_ms"),
                  TARGET_1G_PREFLIGHT_MS, why)  # fmt: skip
        pk = s.get("postcopy_pages_key")
        pages = (f"all pages moved {_ms(pc.get(pk)) if pk else '-'}, "
                 f"lazy floor's {_ms(s.get('lazy_floor_pages_done_ms'))}")  # fmt: skip
        note = pages if pc else (postcopy_note or "post-copy not run")
        check(f"{size}: post-copy downtime <= {TARGET_POSTCOPY_RATIO:g}x the local lazy floor",
              s.get("ratio_postcopy_vs_lazy_floor"), TARGET_POSTCOPY_RATIO,
              f"{_ms(pc.get('downtime'))} vs {_ms(s.get('lazy_floor_downtime_ms'))}; {note}")  # fmt: skip
        check(f"{size}: post-copy downtime <= {TARGET_1G_POSTCOPY_MS:g} ms (stretch)", pc.get("downtime"),
              TARGET_1G_POSTCOPY_MS, note)  # fmt: skip
    if not any(is_1g(s) for s in summaries):
        why = "no 1 GiB size in this run (--sizes ...,1G)"
        for strategy in strategies:
            check(f"1G: {strategy} pre-flight pause <= {TARGET_1G_PREFLIGHT_MS:g} ms", None, TARGET_1G_PREFLIGHT_MS, why)
        check(f"1G: stop-and-copy downtime <= {TARGET_RATIO_1G:g}x the floor", None, TARGET_RATIO_1G, why)
        check(f"1G: post-copy downtime <= {TARGET_POSTCOPY_RATIO:g}x the local lazy floor", None,
              TARGET_POSTCOPY_RATIO, why)  # fmt: skip
        check(f"1G: post-copy downtime <= {TARGET_1G_POSTCOPY_MS:g} ms (stretch)", None, TARGET_1G_POSTCOPY_MS, why)
    return out


def print_report(summaries: list[dict], checks: list[dict], postcopy_note: str) -> None:
    print()
    print("floor = lxc-checkpoint -s then -r -d of the same container on one host, same run;")
    print("lazy floor = its lazy-pages dump and lazy restore (a copy, same host, loopback page server, no TLS),")
    print("             to compare post-copy with (the product's post-copy pages go over TLS: the floor excludes that);")
    print("downtime = freeze to running; pauses = pre-flight pause + downtime, what the workload sees per migration;")
    print("all pages = freeze to the last page moved (post-copy); ratio = downtime / its floor's downtime. Medians.")
    print(f"{'size':<6} {'':<20} {'pre-flight':>10} {'downtime':>9} {'pauses':>9} {'ratio':>7} {'all pages':>10}")

    def ratio(v):
        return f"{v:.2f}x" if v is not None else "-"

    for s in summaries:
        sc, pc, pz = s.get(STOP_AND_COPY, {}), s.get(POST_COPY, {}), s.get("pauses", {})
        rows = [("floor (local)", None, s["floor_downtime_ms"], s["floor_downtime_ms"], None, None)]
        if sc:
            p = pz[STOP_AND_COPY]
            rows.append((STOP_AND_COPY, p["preflight_ms"], p["downtime_ms"], p["total_ms"],
                         s.get("ratio_stop_and_copy_vs_floor"), None))  # fmt: skip
        if s.get("lazy_floor_n"):
            rows.append(("lazy floor (local)", None, s["lazy_floor_downtime_ms"], s["lazy_floor_downtime_ms"], None,
                         s["lazy_floor_pages_done_ms"]))  # fmt: skip
        if pc:
            p, pk = pz[POST_COPY], s.get("postcopy_pages_key")
            rows.append((POST_COPY, p["preflight_ms"], p["downtime_ms"], p["total_ms"],
                         s.get("ratio_postcopy_vs_lazy_floor"), pc.get(pk) if pk else None))  # fmt: skip
        for i, (what, pre, down, total, r, pages) in enumerate(rows):
            print(f"{s['size'] if i == 0 else '':<6} {what:<20} {_ms(pre):>10} {_ms(down):>9} {_ms(total):>9} "
                  f"{ratio(r):>7} {_ms(pages):>10}")  # fmt: skip
        print(f"       floor: dump {_ms(s['floor_dump_wall_ms'])} (CRIU freezing {_ms(s['floor_criu_freezing_ms'])}, "
              f"frozen {_ms(s['floor_criu_frozen_ms'])}), restore {_ms(s['floor_restore_wall_ms'])} "
              f"(CRIU {_ms(s['floor_criu_restore_ms'])}); cross-host CRIU restore "
              f"{_ms(sc.get('criu_restore'))} = {ratio(s.get('ratio_criu_restore_cross_vs_local'))}")  # fmt: skip
        if s.get("lazy_floor_n"):
            print(f"       lazy floor: images ready {_ms(s['lazy_floor_images_ready_ms'])} after the freeze, "
                  f"criu lazy-pages up {_ms(s['lazy_floor_lazy_pages_ready_ms'])}, restore "
                  f"{_ms(s['lazy_floor_restore_wall_ms'])} (CRIU {_ms(s['lazy_floor_criu_restore_ms'])}), "
                  f"{(s['lazy_floor_lazy_bytes'] or 0) / 1e6:.1f} MB served lazily")  # fmt: skip
            if s.get("lazy_floor_leftovers"):
                print(f"       lazy floor's copy left (cleaned): {'; '.join(s['lazy_floor_leftovers'])}")
        for strategy, t in ((STOP_AND_COPY, sc), (POST_COPY, pc)):
            if t:
                keys = [k for k in t if k not in ("n", "directions")]
                print(f"       {strategy} medians (ms): " + ", ".join(_fmt(k, t[k]) for k in keys))
        for strategy in (STOP_AND_COPY, POST_COPY):
            p = pz.get(strategy)
            if p and p["preflight_reported"] < p["n"]:
                print(f"       {strategy}: pre-flight pause not reported by {p['n'] - p['preflight_reported']} of "
                      f"{p['n']} operations (counted as unknown, not 0)")  # fmt: skip
    if postcopy_note:
        print(f"post-copy: {postcopy_note}")
    for c in checks:
        verdict = {True: "PASS", False: "FAIL", None: "not measured"}[c["pass"]]
        value = "-" if c["value"] is None else f"{c['value']:g}"
        note = f"; {c['note']}" if c.get("note") else ""
        print(f"{verdict:<12} {c['target']} (measured {value}{note})")


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
    strategies, postcopy_note, facts = [STOP_AND_COPY], "", {}
    try:
        settings = CliSettings.load(info.cli_config)
        async with ControllerClient(settings.controller, settings.tls, timeout=900) as fleet:
            bench = Bench(args, info, fleet)
            nodes = [await fleet.get_node(n) for n in LAB_NODES]
            facts = {n.name: {"live_strategies": list(n.facts.live_strategies),
                              "live_unavailable": dict(n.facts.live_unavailable),
                              "criu": n.facts.criu_version, "kernel": n.facts.kernel} for n in nodes}  # fmt: skip
            strategies = [s for s in (STOP_AND_COPY, POST_COPY) if all(s in n.facts.live_strategies for n in nodes)
                          and s in args.strategies]  # fmt: skip
            postcopy_note = ""
            if POST_COPY not in strategies and POST_COPY in args.strategies:
                why = "; ".join(f"{n.name}: {n.facts.live_unavailable.get(POST_COPY, 'not listed')}"
                                for n in nodes if POST_COPY not in n.facts.live_strategies)  # fmt: skip
                postcopy_note = f"not offered by the nodes ({why})"
                bench.log(f"post-copy: {postcopy_note}")
            if STOP_AND_COPY not in strategies and STOP_AND_COPY in args.strategies:
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
                    if run.get("floor") or run.get("lazy_floor"):
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
    checks = verdicts(summaries, strategies, postcopy_note)
    print_report(summaries, checks, postcopy_note)
    for e in errors:
        print(f"ERROR        {e['size']}: {e['error']}")
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"live_migration-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({
        "config": {"sizes": [s.label for s in args.sizes], "n": args.n, "rate_mb_s": args.rate, "lab": args.lab,
                   "memory": args.memory},
        "nodes": facts, "strategies": strategies, "postcopy_note": postcopy_note,
        "targets": {"ratio": TARGET_RATIO, "ratio_1g": TARGET_RATIO_1G, "small_ms": TARGET_SMALL_MS,
                    "criu_restore_ratio": TARGET_RESTORE_RATIO, "1g_preflight_ms": TARGET_1G_PREFLIGHT_MS,
                    "postcopy_vs_lazy_floor_ratio": TARGET_POSTCOPY_RATIO, "1g_postcopy_ms": TARGET_1G_POSTCOPY_MS},
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
    p.add_argument("--memory", choices=sorted(MEMORY_HOLDERS), default="text",
                   help="what the sized workloads hold: text (compressible, dirtied) or random (default: text)")
    p.add_argument("--lab", default="lmb")
    p.add_argument("--keep", action="store_true", help="leave the lab up if this run brought it up")
    p.add_argument("--strategies", default=f"{STOP_AND_COPY},{POST_COPY}",
                   type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
                   help=f"comma-separated, of {STOP_AND_COPY},{POST_COPY} (default: both, where the nodes offer them)")
    p.add_argument("--inner-floor", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--inner-lazy-floor", action="store_true", help=argparse.SUPPRESS)
    for opt in ("--lxc-path", "--name", "--images"):
        p.add_argument(opt, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inner_floor:
        print(json.dumps(inner_floor(args)))
        return 0
    if args.inner_lazy_floor:
        print(json.dumps(inner_lazy_floor(args)))
        return 0
    if args.n < 1:
        p.error("-n must be at least 1")
    if not args.strategies or set(args.strategies) - {STOP_AND_COPY, POST_COPY}:
        p.error(f"--strategies takes {STOP_AND_COPY} and/or {POST_COPY}, comma-separated")
    return asyncio.run(outer(args))


if __name__ == "__main__":
    sys.exit(main())
