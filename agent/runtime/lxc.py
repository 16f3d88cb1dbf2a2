"""The host's LXC, driven through the `lxc-*` tools with the agent's own LXC path.

Each agent has its own LXC path, so several agents (lab hosts) share one
machine without seeing each other's containers.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Mapping, Sequence

from agent.runtime.cgroups import cgroup_dirs_of, remove_empty
from corral import proc
from corral.errors import FailedPrecondition, NotFound, RuntimeFailure
from corral.model import ContainerState

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_LXC_STATES = {
    "STOPPED": ContainerState.STOPPED,
    "STARTING": ContainerState.STARTING,
    "RUNNING": ContainerState.RUNNING,
    "STOPPING": ContainerState.STOPPING,
    "ABORTING": ContainerState.STOPPING,
    "FREEZING": ContainerState.FROZEN,
    "FROZEN": ContainerState.FROZEN,
    "THAWED": ContainerState.RUNNING,
}


@dataclass(frozen=True)
class RuntimeStatus:
    state: ContainerState
    init_pid: int = 0


class LxcRuntime:
    def __init__(self, lxc_path: Path, command_timeout: float = 60.0) -> None:
        self.lxc_path = lxc_path
        self.command_timeout = command_timeout

    def container_dir(self, name: str) -> Path:
        return self.lxc_path / name

    def config_file(self, name: str) -> Path:
        return self.container_dir(name) / "config"

    def exists(self, name: str) -> bool:
        return self.config_file(name).is_file()

    def names(self) -> list[str]:
        if not self.lxc_path.is_dir():
            return []
        return sorted(p.name for p in self.lxc_path.iterdir() if (p / "config").is_file())

    async def _lxc(self, tool: str, name: str, *args: str, timeout: float | None = None, check: bool = True):
        argv = [tool, "-P", str(self.lxc_path), "-n", name, *args]
        return await proc.run(argv, timeout=timeout or self.command_timeout, check=check, what=f"{tool} {name}")

    def running_names(self) -> set[str]:
        """Containers whose LXC monitor is up, from one read of /proc/net/unix.

        Each running container's monitor listens on the abstract socket
        "@LXCPATH/NAME/command" (in the network namespace of whoever started
        it, which is this agent's): far cheaper than asking LXC one by one.
        """
        prefix = f"@{self.lxc_path}/"
        running = set()
        with open("/proc/net/unix", "rb") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1].decode(errors="replace")
                if path.startswith(prefix) and path.endswith("/command"):
                    running.add(path[len(prefix) : -len("/command")])
        return running

    def _monitor_pidfile(self, name: str) -> Path:
        return self.container_dir(name) / "monitor.pid"

    def _init_pid_from_monitor(self, name: str) -> int:
        # The monitor (pid written by `lxc-start -p`) has exactly one child: the container's init.
        try:
            monitor = int(self._monitor_pidfile(name).read_text().strip())
            children = Path(f"/proc/{monitor}/task/{monitor}/children").read_text().split()
            if f"{self.lxc_path} {name}".encode() not in Path(f"/proc/{monitor}/cmdline").read_bytes().replace(b"\0", b" "):
                return 0
            return int(children[0]) if children else 0
        except (OSError, ValueError):
            return 0

    async def status(self, name: str) -> RuntimeStatus:
        if not self.exists(name):
            raise NotFound(f"container {name!r} does not exist on this host")
        if name not in self.running_names():
            return RuntimeStatus(ContainerState.STOPPED, 0)
        pid = self._init_pid_from_monitor(name)
        if pid:
            return RuntimeStatus(ContainerState.RUNNING, pid)
        return await self._lxc_info(name)

    async def _lxc_info(self, name: str) -> RuntimeStatus:
        done = await self._lxc("lxc-info", name, "-s", "-p", check=False)
        if done.returncode != 0:
            raise RuntimeFailure(f"lxc-info {name} failed: {done.output}")
        state, pid = ContainerState.UNKNOWN, 0
        for line in done.stdout.decode().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "State":
                state = _LXC_STATES.get(value.strip(), ContainerState.UNKNOWN)
            elif key.strip() == "PID":
                pid = int(value.strip() or 0)
        return RuntimeStatus(state, pid)

    async def start(self, name: str) -> RuntimeStatus:
        """Start detached; returns once LXC reports the container running."""
        done = await self._lxc("lxc-start", name, "-d", "-p", str(self._monitor_pidfile(name)), check=False)
        if done.returncode != 0:
            raise RuntimeFailure(f"lxc-start {name} failed: {done.output or 'see the container log'}")
        pid = self._init_pid_from_monitor(name)
        return RuntimeStatus(ContainerState.RUNNING, pid) if pid else await self._lxc_info(name)

    async def stop(self, name: str, *, force: bool, timeout: float) -> None:
        init_pid = (await self.status(name)).init_pid
        cgroups = await asyncio.to_thread(cgroup_dirs_of, init_pid) if init_pid else []
        args = ["-k"] if force else ["-t", str(int(timeout))]
        done = await self._lxc("lxc-stop", name, *args, timeout=timeout + 30, check=False)
        # Exit 2 means "already stopped" for lxc-stop: that is what we wanted.
        if done.returncode not in (0, 2):
            raise RuntimeFailure(f"lxc-stop {name} failed (exit {done.returncode}): {done.output}")
        # LXC can leave its cgroups behind (measured: the cgroup2 one of a hybrid host, for a
        # container frozen when stopped, as a post-copy source is); left, the next start of
        # `name` here lands in lxc.payload.NAME-1. Exactly the ones its init was in, if empty.
        for _ in range(5):  # its last tasks may still be exiting for a moment
            await asyncio.to_thread(remove_empty, cgroups)
            if not any(c.exists() for c in cgroups):
                break
            await asyncio.sleep(0.05)

    async def set_cgroup(self, name: str, key: str, value: str) -> None:
        done = await self._lxc("lxc-cgroup", name, key, value, check=False)
        if done.returncode != 0:
            raise FailedPrecondition(f"cannot set {key}={value} on {name}: {done.output}")

    def attach(
        self, name: str, argv: Sequence[str], *, env: Mapping[str, str], stdin: bytes, timeout: float
    ) -> AsyncIterator[proc.Output | proc.Exited]:
        """Run a command in the container: its output as it comes, then how it ended. The
        command runs as lxc-attach's child, in its process group: a timeout (or the caller going
        away) kills it and what it started inside the container, not only lxc-attach."""
        return proc.stream(self.attach_argv(name, argv, env), timeout=timeout, input=stdin, cwd="/")

    def attach_argv(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
        """The `lxc-attach` command line that runs `argv` in the container, with a clean
        environment: a PATH, HOME, TERM (dumb unless given) and `env`."""
        cmd = ["lxc-attach", "-P", str(self.lxc_path), "-n", name, "--clear-env"]
        variables = {"PATH": DEFAULT_PATH, "HOME": "/root", "TERM": "dumb", **env}
        for key, value in variables.items():
            cmd += ["-v", f"{key}={value}"]
        return [*cmd, "--", *argv]

    @staticmethod
    def version_of(output: str) -> str:
        match = re.search(r"\d+\.\d+(\.\d+)?", output)
        return match.group(0) if match else output.strip()
