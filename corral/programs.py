"""Every program Corral runs, the Debian package that brings it, and what needs it.

The one place programs are declared (DESIGN.md rule 7). The host setup installs
the packages listed here and checks afterwards that each program is found; the
agent reports a capability whose program is missing as unavailable, with the
reason; `corral.proc` refuses to run a program that is not declared; a test scans
the source for programs run and fails on any missing here.

Standard library only: `deploy/setup-host.sh` runs this file with the system
python3 before the project's venv exists (`python3 corral/programs.py packages`).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from typing import Iterable, Sequence

# Who runs it: the agent on every host, the lab (the demo and the tests), the tests
# themselves, the benchmarks.
AGENT, LAB, TESTS, BENCH = "agent", "lab", "tests", "bench"

# Capabilities of a host (what `corral node show` lists as unavailable, with the reason).
CONTAINERS = "containers"
EXEC = "exec"
LIVE_MIGRATION = "live-migration"  # CRIU checkpoint/restore: stop-and-copy, pre-copy
POST_COPY = "post-copy"
TRANSFER = "transfer"  # rsync between hosts (local storage, live rootfs copies)
STORAGE_IMAGE = "storage-image"
STORAGE_LVM = "storage-lvm"
TEMPLATE_BUSYBOX = "template-busybox"
TEMPLATE_DEBIAN = "template-debian"

# Where the programs are looked for, whatever PATH the agent was started with.
SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Not Debian packages here: CRIU is built by the project's own script (Debian 12's fails
# `criu check` on this kernel); the interpreter is whichever python3 setup-host.sh chose.
CRIU_SOURCE = "deploy/install-criu.sh"
PYTHON_SOURCE = "deploy/setup-host.sh (python3 >= 3.11 with venv)"
_NOT_APT = (CRIU_SOURCE, PYTHON_SOURCE)


@dataclass(frozen=True)
class Program:
    name: str  # as it is run (argv[0]'s base name)
    package: str  # the Debian package that installs it, or CRIU_SOURCE
    needed_for: tuple[str, ...]  # capabilities (agent) or roles (lab, tests, bench) that need it
    roles: tuple[str, ...] = (AGENT,)
    optional: bool = False  # a peer measured when present: neither installed by the setup nor checked

    def where_from(self) -> str:
        return f"installed by {self.package}" if self.package in _NOT_APT else f"Debian package {self.package}"


def _p(name: str, package: str, *needed_for: str, roles: tuple[str, ...] = (AGENT,), optional: bool = False) -> Program:
    return Program(name, package, needed_for, roles, optional)


_ALL = (AGENT, LAB, TESTS)

PROGRAMS: tuple[Program, ...] = (
    # LXC: the container runtime.
    _p("lxc-start", "lxc", CONTAINERS, roles=(AGENT, BENCH)),
    _p("lxc-stop", "lxc", CONTAINERS, roles=(AGENT, LAB, BENCH)),
    _p("lxc-info", "lxc", CONTAINERS),
    _p("lxc-cgroup", "lxc", CONTAINERS),
    _p("lxc-attach", "lxc", EXEC),
    # `ct exec -t`, `ct enter`: makes the host side of the pseudo-terminal lxc-attach's
    # controlling terminal (lxc-attach then passes window sizes into the container).
    _p("setsid", "util-linux", EXEC, TESTS, roles=(AGENT, TESTS)),
    _p("lxc-ls", "lxc", LAB, roles=(LAB, TESTS)),
    _p("lxc-checkpoint", "lxc", LIVE_MIGRATION, POST_COPY, roles=(AGENT, BENCH)),
    # CRIU, and the network lock around a dump (CRIU's nftables lock is in-process;
    # iptables-restore is its fallback and what our unlock of a restored container feeds).
    _p("criu", CRIU_SOURCE, LIVE_MIGRATION, POST_COPY),
    _p("iptables-restore", "iptables", LIVE_MIGRATION),
    _p("ip6tables-restore", "iptables", LIVE_MIGRATION),
    # Post-copy: the source's own network lock (nft, entered with nsenter) and the
    # freeze script CRIU runs at its pre-dump and post-dump stages (sh, date, grep, sleep).
    _p("nft", "nftables", POST_COPY, roles=(AGENT, TESTS)),
    _p("nsenter", "util-linux", POST_COPY, LAB, roles=(AGENT, LAB)),
    _p("sh", "dash", POST_COPY, LIVE_MIGRATION),
    _p("date", "coreutils", POST_COPY, LIVE_MIGRATION),
    _p("grep", "grep", POST_COPY, LIVE_MIGRATION),
    _p("sleep", "coreutils", POST_COPY, LIVE_MIGRATION, roles=(AGENT, TESTS)),
    # Moving files between hosts (the agent's own SSH endpoint runs rsync --server).
    _p("rsync", "rsync", TRANSFER, roles=(AGENT, BENCH, TESTS)),
    _p("ssh", "openssh-client", TRANSFER, roles=(AGENT, BENCH)),
    # Storage: `dir` needs nothing beyond cp; `image` is an ext4 image loop-mounted by its owner.
    _p("cp", "coreutils", CONTAINERS, TEMPLATE_DEBIAN, roles=(AGENT, TESTS)),
    _p("losetup", "mount", STORAGE_IMAGE, roles=(AGENT, TESTS)),
    _p("mount", "mount", STORAGE_IMAGE, STORAGE_LVM, LAB, roles=_ALL + (BENCH,)),
    _p("umount", "mount", STORAGE_IMAGE, STORAGE_LVM, LAB, roles=_ALL + (BENCH,)),
    _p("mkfs.ext4", "e2fsprogs", STORAGE_IMAGE, STORAGE_LVM),
    _p("e2fsck", "e2fsprogs", STORAGE_IMAGE, STORAGE_LVM),
    _p("lvm", "lvm2", STORAGE_LVM),
    _p("lvcreate", "lvm2", STORAGE_LVM),
    _p("lvremove", "lvm2", STORAGE_LVM),
    _p("lvchange", "lvm2", STORAGE_LVM),
    _p("lvs", "lvm2", STORAGE_LVM),
    _p("dmsetup", "dmsetup", STORAGE_LVM),
    _p("pvcreate", "lvm2", STORAGE_LVM, roles=(TESTS,)),
    _p("pvremove", "lvm2", STORAGE_LVM, roles=(TESTS,)),
    _p("vgcreate", "lvm2", STORAGE_LVM, roles=(TESTS,)),
    _p("vgremove", "lvm2", STORAGE_LVM, roles=(TESTS,)),
    # Templates.
    _p("busybox", "busybox-static", TEMPLATE_BUSYBOX),
    _p("debootstrap", "debootstrap", TEMPLATE_DEBIAN),
    # The lab: hosts as network namespaces, and faults the tests inject.
    _p("ip", "iproute2", LAB, roles=(LAB,)),
    _p("unshare", "util-linux", LAB, roles=(LAB, TESTS)),
    _p("cat", "coreutils", LAB, roles=(LAB,)),
    _p("tc", "iproute2", TESTS, roles=(TESTS,)),
    _p("ls", "coreutils", TESTS, roles=(TESTS,)),
    _p("python3", PYTHON_SOURCE, LAB, roles=(LAB, TESTS, BENCH)),  # the project's own interpreter (its venv)
    # Benchmarks: rsync over OpenSSH's sshd, next to the agent's own endpoint.
    _p("sshd", "openssh-server", BENCH, roles=(BENCH,)),
    _p("mkdir", "coreutils", BENCH, roles=(BENCH,)),
    _p("apt-get", "apt", BENCH, roles=(BENCH,)),
    _p("dpkg", "dpkg", BENCH, roles=(BENCH,)),
    # The peer the CLI is measured against (bookworm-backports), where an operator installed it.
    _p("incus", "incus", BENCH, roles=(BENCH,), optional=True),
    # Checks the systemd units (deploy/systemd) where systemd is installed; skipped elsewhere.
    _p("systemd-analyze", "systemd", TESTS, roles=(TESTS,), optional=True),
)

BY_NAME: dict[str, Program] = {p.name: p for p in PROGRAMS}
# Commands that run another command given after `--` (that one must be declared too).
WRAPPERS = frozenset({"nsenter", "unshare"})


class UndeclaredProgram(Exception):
    """Code asked to run a program that is not declared in corral/programs.py."""


def program_name(arg0: str | os.PathLike[str]) -> str:
    name = os.path.basename(os.fspath(arg0))
    # A versioned interpreter (python3.11) is the same program as `python`.
    return "python3" if name.startswith("python") else name


def check_argv(argv: Sequence[str | os.PathLike[str]]) -> None:
    """Refuse an argv whose program (or, for a wrapper, the program it wraps) is not declared."""
    if not argv:
        raise UndeclaredProgram("empty command")
    names = [program_name(argv[0])]
    if names[0] in WRAPPERS:
        args = [os.fspath(a) for a in argv]
        if "--" in args and args.index("--") + 1 < len(args):
            names.append(program_name(args[args.index("--") + 1]))
    for name in names:
        if name not in BY_NAME:
            raise UndeclaredProgram(f"{name!r} is run but not declared in corral/programs.py (DESIGN.md rule 7)")


def find(name: str, path: str = SEARCH_PATH) -> str | None:
    return shutil.which(name, path=path)


def missing(capability: str, path: str = SEARCH_PATH) -> list[Program]:
    """The declared programs `capability` needs that are not found."""
    return [p for p in PROGRAMS if capability in p.needed_for and find(p.name, path) is None]


def why_unavailable(capability: str, path: str = SEARCH_PATH) -> str:
    """'' if every program `capability` needs is found, else e.g. 'nft not found (Debian package nftables)'."""
    return "; ".join(f"{p.name} not found ({p.where_from()})" for p in missing(capability, path))


def packages(roles: Iterable[str]) -> list[str]:
    wanted = set(roles)
    return sorted({p.package for p in PROGRAMS
                   if p.package not in _NOT_APT and not p.optional and wanted & set(p.roles)})  # fmt: skip


def _main(argv: list[str]) -> int:
    usage = "usage: programs.py packages ROLE... | check ROLE...   (roles: agent lab tests bench)"
    if len(argv) < 2 or argv[0] not in ("packages", "check"):
        print(usage, file=sys.stderr)
        return 2
    roles = argv[1:]
    unknown = set(roles) - {AGENT, LAB, TESTS, BENCH}
    if unknown:
        print(f"unknown role(s): {' '.join(sorted(unknown))}; {usage}", file=sys.stderr)
        return 2
    if argv[0] == "packages":
        print("\n".join(packages(roles)))
        return 0
    absent = [p for p in PROGRAMS if set(roles) & set(p.roles) and not p.optional and find(p.name) is None]
    for p in absent:
        print(f"{p.name}: not found ({p.where_from()}; needed for {', '.join(p.needed_for)})", file=sys.stderr)
    return 1 if absent else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
