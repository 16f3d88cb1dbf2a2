"""A container kept still: its freezer cgroup, and its network locked while it is frozen.

Why our own: CRIU freezes a cgroup itself but re-reads its state only every 100 ms (most
of a small container's pause, measured), and a post-copy source that must neither run nor
answer for its address after its dump (the destination has both) needs a freeze and a
network lock that outlive CRIU. The action script written here does both at CRIU's
`pre-dump` and `post-dump` stages; the marks it leaves in the images directory tell the
restore to thaw what CRIU restores frozen, and an agent that restarted what state a
source was left in.
"""

from __future__ import annotations

import contextlib
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from corral import proc

# Marks images of a pre-frozen container: CRIU saved its freezer state as FROZEN (it records
# the state it found) and restores it so, so the restore thaws it (see Freezer.action_script).
PREFROZEN_MARK = "corral-prefrozen"
FREEZE_SCRIPT = "corral-freeze.sh"  # CRIU action script (lxc-checkpoint -A)
FROZEN_AT = "corral-frozen-at"  # when the freeze began (epoch seconds), written by that script
NETLOCK_RULES = "corral-netlock.nft"  # our own network lock for a post-copy source that is kept (see LazyDump)
NETLOCKED = "corral-netlocked"  # written by the action script once that lock is in place
NETLOCK_ERROR = "corral-netlock.err"  # what nft said when that lock failed
NETLOCK_TABLE = "corral-lock"
# The network tools run with a plain PATH, whatever the agent was started with.
_TOOL_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


@dataclass(frozen=True)
class Freezer:
    """The container's freezer: cgroup v1 `freezer.state` or cgroup v2 `cgroup.freeze`."""

    path: Path  # the cgroup directory
    v2: bool

    @classmethod
    def of(cls, pid: int) -> Freezer | None:
        try:
            cgroups = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
            mounts = Path("/proc/self/mountinfo").read_text().splitlines()
        except OSError:
            return None
        v1 = next((line.split(":", 2)[2] for line in cgroups if "freezer" in line.split(":", 2)[1].split(",")), None)
        v2 = next((line.split(":", 2)[2] for line in cgroups if line.startswith("0::")), None)
        for line in mounts:
            pre, _, post = line.partition(" - ")
            fstype, _source, options = (post.split() + ["", "", ""])[:3]
            mount_point = pre.split()[4]
            if v1 is not None and fstype == "cgroup" and "freezer" in options.split(","):
                return cls(Path(mount_point) / v1.lstrip("/"), False)
            if v1 is None and v2 is not None and fstype == "cgroup2":
                return cls(Path(mount_point) / v2.lstrip("/"), True)
        return None

    def _write(self, frozen: bool) -> None:
        if self.v2:
            (self.path / "cgroup.freeze").write_text("1" if frozen else "0")
        else:
            (self.path / "freezer.state").write_text("FROZEN" if frozen else "THAWED")

    def freeze(self, timeout: float = 2.0) -> bool:
        """Freeze and wait (at most `timeout`) until it is; True if it is frozen."""
        with contextlib.suppress(OSError):
            self._write(True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.frozen():
                return True
            time.sleep(0.001)
        return self.frozen()

    def frozen(self) -> bool:
        try:
            if self.v2:
                return "frozen 1" in (self.path / "cgroup.events").read_text().splitlines()
            return (self.path / "freezer.state").read_text().strip() == "FROZEN"
        except OSError:
            return False

    def action_script(self, images: Path, lock_after_dump: bool = False) -> str:
        """A CRIU action script that freezes the container at CRIU's `pre-dump` stage.

        Why: CRIU freezes the cgroup itself but re-reads its state only every 100 ms, and on
        cgroup v1 the first read after the write is usually FREEZING: measured, that sleep was
        100 of CRIU's ~180 ms of pause for a small container. Frozen here (polled every ms), CRIU
        finds it FROZEN and seizes at once. Why `pre-dump` and not before lxc-checkpoint: it
        runs after LXC's and CRIU's start-up (CRIU's kernel probing takes ~30 ms where /run is
        not a tmpfs and its cache cannot be kept), which then stays outside the pause.
        CRIU records the state it found (FROZEN) in the images and restores it so: the marker
        file tells our restore to thaw it. If the freeze does not happen in 2 s, it thaws and
        leaves the freezing to CRIU (whose loop has kludges for stubborn v1 cgroups).
        `lock_after_dump`: at `post-dump` (before CRIU lifts its own network lock, which it does
        for a dump that leaves its tasks alive) put our own lock, NETLOCK_RULES, in the
        container's network namespace, and say so in NETLOCKED."""
        q = shlex.quote
        state, mark, at = q(str(self._state_file)), q(str(images / PREFROZEN_MARK)), q(str(images / FROZEN_AT))
        lock = ""
        if lock_after_dump:
            rules, locked = q(str(images / NETLOCK_RULES)), q(str(images / NETLOCKED))
            err = q(str(images / NETLOCK_ERROR))
            lock = (
                'if [ "$CRTOOLS_SCRIPT_ACTION" = post-dump ]; then\n'
                f'    nsenter -t "$CRTOOLS_INIT_PID" -n nft -f {rules} 2> {err} && : > {locked}\n'
                "    exit 0\n"
                "fi\n"
            )
        frozen_word = "1" if self.v2 else "FROZEN"
        thawed_word = "0" if self.v2 else "THAWED"
        if self.v2:
            events = q(str(self.path / "cgroup.events"))
            is_frozen = f"grep -qx 'frozen 1' {events}"
        else:
            is_frozen = f'{{ read -r s < {state} && [ "$s" = FROZEN ]; }}'
        return (
            "#!/bin/sh\n"
            "# Written by corral-agent for one checkpoint (agent/runtime/checkpoint.py).\n"
            f"{lock}"
            '[ "$CRTOOLS_SCRIPT_ACTION" = pre-dump ] || exit 0\n'
            f"date +%s.%N > {at}\n"
            f"echo {frozen_word} > {state} || exit 0\n"
            "n=0\n"
            f"until {is_frozen}; do\n"
            f"    n=$((n+1)); if [ $n -ge 2000 ]; then echo {thawed_word} > {state}; exit 0; fi\n"
            "    sleep 0.001\n"
            "done\n"
            f": > {mark}\n"
        )

    @property
    def _state_file(self) -> Path:
        return self.path / ("cgroup.freeze" if self.v2 else "freezer.state")

    def thaw(self) -> None:
        with contextlib.suppress(OSError):
            self._write(False)


def write_executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o700)


def network_lock_error(images: Path) -> str:
    """Why the action script's network lock failed: the command and what it printed."""
    try:
        said = (images / NETLOCK_ERROR).read_text(errors="replace").strip()
    except OSError:
        said = ""
    command = f"nsenter -t PID -n nft -f {images / NETLOCK_RULES}"
    return f"`{command}` failed: {said[-1000:]}" if said else f"`{command}` did not run or printed nothing"


def read_frozen_at(images: Path) -> float | None:
    try:
        return float((images / FROZEN_AT).read_text().strip())
    except (OSError, ValueError):
        return None


IPTABLES_UNLOCK = (  # what CRIU's own unlock feeds iptables-restore (criu/net.c)
    b"*filter\n:CRIU - [0:0]\n-D INPUT -j CRIU\n-D OUTPUT -j CRIU\nCOMMIT\n",
    b"*filter\n:CRIU - [0:0]\n-X CRIU\nCOMMIT\n",
)


# Our own lock for a kept post-copy source (LazyDump): no IPv4/IPv6 and no ARP in or out, so the
# frozen source's kernel neither answers for its address (the destination has the same address and
# MAC) nor acknowledges data its processes will never see.
NETLOCK_RULES_TEXT = f"""table inet {NETLOCK_TABLE} {{
    chain input {{ type filter hook input priority -10; policy drop; }}
    chain output {{ type filter hook output priority -10; policy drop; }}
}}
table arp {NETLOCK_TABLE} {{
    chain input {{ type filter hook input priority 0; policy drop; }}
    chain output {{ type filter hook output priority 0; policy drop; }}
}}
"""


async def remove_network_lock(pid: int) -> None:
    """Undo CRIU's network lock (and ours, NETLOCK_TABLE) in the network namespace of `pid`,
    whichever kind it is."""
    enter = ["nsenter", "-t", str(pid), "-n", "--"]
    tables = await proc.run([*enter, "nft", "list", "tables"], timeout=10, check=False, env=_TOOL_ENV)
    for line in tables.stdout.decode().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "table" and (parts[2].startswith("CRIU") or parts[2] == NETLOCK_TABLE):
            await proc.run([*enter, "nft", "delete", "table", parts[1], parts[2]], timeout=10, check=False,
                           env=_TOOL_ENV)  # fmt: skip
    for tool in ("iptables-restore", "ip6tables-restore"):
        for script in IPTABLES_UNLOCK:
            await proc.run([*enter, tool, "-w", "--noflush"], input=script, timeout=10, check=False, env=_TOOL_ENV)
