"""Root filesystem templates: what a new container's rootfs is made from.

- `busybox`: a static busybox and a minimal init; no host directories are
  bind-mounted, so the container can be checkpointed (DESIGN.md).
- `debian`: Debian bookworm from debootstrap, built once per host into the
  template cache (from the mirror the host's own apt uses), then copied, with
  drop-ins that keep systemd's units checkpointable (checkpointable_systemd).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from corral import proc
from corral.errors import FailedPrecondition, InvalidArgument

BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
DEBIAN_SUITE = "bookworm"
# busybox: small services for tests and demos (`busybox httpd`), and wget to reach them.
DEBIAN_PACKAGES = "systemd-sysv,iproute2,procps,iputils-ping,python3-minimal,busybox"


def debian_cache_key(suite: str = DEBIAN_SUITE, packages: str = DEBIAN_PACKAGES) -> str:
    """The cache directory's name: it changes with the suite or the package list, so a
    cache built from an older list is never used for a newer one."""
    wanted = ",".join(sorted(p.strip() for p in packages.split(",") if p.strip()))
    return f"debian-{suite}-{hashlib.sha256(wanted.encode()).hexdigest()[:12]}"


class Template(Protocol):
    name: str
    halt_signal: str

    async def populate(self, rootfs: Path, hostname: str) -> None: ...


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


@dataclass
class BusyboxTemplate:
    name = "busybox"
    halt_signal = "SIGUSR1"  # busybox init halts on USR1

    async def populate(self, rootfs: Path, hostname: str) -> None:
        busybox = next((p for p in BUSYBOX_CANDIDATES if p.is_file()), None)
        if busybox is None:
            raise FailedPrecondition("busybox is not installed on this host (install busybox-static)")
        done = await proc.run([str(busybox), "--list-full"], timeout=10, what="busybox --list-full")
        applets = done.stdout.decode().split()
        await asyncio.to_thread(self._build, rootfs, busybox, applets, hostname)

    @staticmethod
    def _build(rootfs: Path, busybox: Path, applets: list[str], hostname: str) -> None:
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc/init.d", "dev", "proc", "sys", "tmp",
                  "root", "home", "mnt", "var/log", "var/run", "run", "dev/pts"):  # fmt: skip
            (rootfs / d).mkdir(parents=True, exist_ok=True)
        (rootfs / "tmp").chmod(0o1777)
        shutil.copy2(busybox, rootfs / "bin" / "busybox")
        for applet in applets:
            link = rootfs / applet
            if not link.exists() and link.name != "busybox":
                link.parent.mkdir(parents=True, exist_ok=True)
                os.symlink("/bin/busybox", link)
        _write(rootfs / "etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
        _write(rootfs / "etc/group", "root:x:0:root\n")
        _write(rootfs / "etc/hostname", hostname + "\n")
        _write(rootfs / "etc/hosts", f"127.0.0.1 localhost\n127.0.1.1 {hostname}\n")
        # No getty, no console: a process tied to a tty cannot be checkpointed.
        _write(
            rootfs / "etc/inittab",
            "::sysinit:/etc/init.d/rcS\n"
            "::respawn:/etc/init.d/workload\n"
            "::shutdown:/bin/umount -a -r\n",
        )
        _write(rootfs / "etc/init.d/rcS", "#!/bin/sh\n/bin/hostname -F /etc/hostname\n/sbin/ip link set lo up\n", 0o755)
        # The workload init keeps alive; replace this file to run a service.
        _write(rootfs / "etc/init.d/workload", "#!/bin/sh\nexec /bin/sleep 2147483647\n", 0o755)


@dataclass
class DebianTemplate:
    cache_dir: Path
    name = "debian"
    halt_signal = "SIGRTMIN+3"  # systemd's halt signal

    @property
    def cached_rootfs(self) -> Path:
        return self.cache_dir / debian_cache_key() / "rootfs"

    async def populate(self, rootfs: Path, hostname: str) -> None:
        await self.ensure_cache()
        await proc.run(["cp", "-a", f"{self.cached_rootfs}/.", str(rootfs)], timeout=600, what="copy debian rootfs")
        await asyncio.to_thread(_write, rootfs / "etc/hostname", hostname + "\n")
        await asyncio.to_thread(_write, rootfs / "etc/hosts", f"127.0.0.1 localhost\n127.0.1.1 {hostname}\n")
        await asyncio.to_thread(checkpointable_systemd, rootfs)

    async def ensure_cache(self, timeout: float = 1800) -> None:
        """Build the cached rootfs once; other agents sharing the cache wait for it."""
        if self.is_cached():
            return
        self.cached_rootfs.parent.mkdir(parents=True, exist_ok=True)
        async with _file_lock(self.cached_rootfs.parent / "build.lock", timeout):
            if self.is_cached():
                return
            mirror = host_debian_mirror()
            staging = self.cached_rootfs.with_name("rootfs.partial")
            if staging.exists():
                await asyncio.to_thread(shutil.rmtree, staging)
            await proc.run(
                ["debootstrap", "--variant=minbase", f"--include={DEBIAN_PACKAGES}", DEBIAN_SUITE, str(staging), mirror],
                timeout=timeout,
                what=f"debootstrap from {mirror} (the host must reach its Debian mirror)",
            )
            staging.rename(self.cached_rootfs)

    def is_cached(self) -> bool:
        return (self.cached_rootfs / "etc/debian_version").is_file()


# Unit settings that make systemd hold what CRIU cannot dump or restore, reset by a drop-in
# (an empty assignment resets each of them):
# - credentials: systemd mounts a ramfs on /run/credentials/UNIT for every unit that has them,
#   and leaves it mounted after a oneshot has run; CRIU refuses the dump ("mnt: FS mnt
#   ./run/credentials/... unsupported"). Debian's units only import optional credentials that
#   nothing passes to a container.
# - IP address filters: systemd attaches cgroup BPF programs and PID 1 keeps their file
#   descriptors; CRIU cannot dump those ("Can't dump file N of that type [600]
#   (anon anon_inode:bpf-prog)"). Debian's journald has IPAddressDeny=any.
_CHECKPOINT_RESETS = (
    ("LoadCredential", "LoadCredentialEncrypted", "SetCredential", "SetCredentialEncrypted"),
    ("IPAddressDeny", "IPAddressAllow"),
)
CHECKPOINT_DROPIN = "10-corral-checkpoint.conf"


def checkpointable_systemd(rootfs: Path) -> list[str]:
    """Write drop-ins into the rootfs's /etc/systemd/system that reset the settings above in
    each shipped service that uses them; returns the services changed. Units installed later
    (apt in the container) are not covered."""
    changed = []
    unit_dirs = {d.resolve() for d in (rootfs / "lib/systemd/system", rootfs / "usr/lib/systemd/system") if d.is_dir()}
    for unit_dir in sorted(unit_dirs):
        for unit in sorted(unit_dir.glob("*.service")):
            if unit.is_symlink() or not unit.is_file():
                continue
            keys = {line.split("=", 1)[0].strip() for line in unit.read_text(errors="replace").splitlines() if "=" in line}
            resets = [key for group in _CHECKPOINT_RESETS for key in group if key in keys]
            if not resets or unit.name in changed:
                continue
            body = "".join(f"{key}=\n" for key in resets)
            _write(
                rootfs / "etc/systemd/system" / f"{unit.name}.d" / CHECKPOINT_DROPIN,
                "# Written by corral (agent/runtime/templates.py): CRIU cannot checkpoint what these\n"
                f"# settings make systemd hold (credential mounts, BPF programs).\n[Service]\n{body}",
            )
            changed.append(unit.name)
    return changed


@contextlib.asynccontextmanager
async def _file_lock(path: Path, timeout: float):
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.5)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def host_debian_mirror() -> str:
    """The Debian mirror this host's apt already uses (operators run their own)."""
    sources = [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]
    for path in sources:
        if not path.is_file():
            continue
        text = path.read_text()
        match = re.search(r"^URIs:\s*(\S+)", text, re.MULTILINE) or re.search(
            r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+\s+main", text, re.MULTILINE
        )
        if match:
            return match.group(1)
    raise FailedPrecondition("cannot find a Debian mirror in this host's apt sources")


def template_named(name: str, cache_dir: Path) -> Template:
    if name == "busybox":
        return BusyboxTemplate()
    if name == "debian":
        return DebianTemplate(cache_dir)
    raise InvalidArgument(f"unknown template {name!r} (available: busybox, debian)")


def main(argv: list[str] | None = None) -> int:
    """`python -m agent.runtime.templates --cache DIR debian`: fill a template cache ahead of use.

    Lab hosts have no route to the outside, so the lab builds the debian
    cache from the machine's own network namespace; agents wait for it.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m agent.runtime.templates")
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--owner", help="who asked (lets `corral lab down` find this process)")
    parser.add_argument("template", choices=["debian"])
    args = parser.parse_args(argv)
    asyncio.run(DebianTemplate(args.cache).ensure_cache())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
