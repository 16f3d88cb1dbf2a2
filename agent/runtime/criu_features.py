"""Which live-migration strategies this host's kernel and CRIU support, and why not.

- stop-and-copy: a working CRIU (`criu check`) and a way to lock the
  container's network while it is frozen (CRIU's nftables lock, preferred,
  or iptables-restore, CRIU's default).
- pre-copy (iterative pre-dumps): the kernel's soft-dirty bits
  (`criu check --feature mem_dirty_track`); off in kernels built without
  CONFIG_MEM_SOFT_DIRTY, as here.
- post-copy (lazy pages): non-cooperative userfaultfd (`--feature
  uffd-noncoop`), and a page server that can grow its tee pipe to
  PIPE_MAX_SIZE (819) pages: without CAP_SYS_RESOURCE that needs
  fs.pipe-max-size >= 4 MiB (the kernel rounds pipe sizes up to a power of
  two, so 819 pages = 3354624 bytes asks for 4194304), else the first page
  request fails with "page-pipe: splice: -1: Bad file descriptor".
- TLS for the page server: a CRIU built with GnuTLS (`criu check --tls` is
  refused with "CRIU was built without TLS support" otherwise).
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from agent.runtime.criu import check_criu, check_feature
from agent.runtime.lxc import DEFAULT_PATH

log = structlog.get_logger("corral.agent.checkpoint")

STOP_AND_COPY = "stop-and-copy"
PRE_COPY = "pre-copy"
POST_COPY = "post-copy"

PAGE_SIZE = 4096
# CRIU's PIPE_MAX_SIZE: (1 << PAGE_ALLOC_COSTLY_ORDER) * PAGE_SIZE / sizeof(struct pipe_buffer) = 819 pages.
CRIU_TEE_PIPE_PAGES = 819
CAP_SYS_RESOURCE = 24
PIPE_MAX_SIZE_FILE = Path("/proc/sys/fs/pipe-max-size")


def pipe_bytes_needed() -> int:
    """The pipe size the kernel checks against fs.pipe-max-size (rounded up to a power of two)."""
    want = CRIU_TEE_PIPE_PAGES * PAGE_SIZE
    return 1 << (want - 1).bit_length()


@dataclass(frozen=True)
class LiveSupport:
    criu_ok: bool
    criu_version: str
    detail: str  # why CRIU itself is not usable, "" when it is
    stop_and_copy: bool
    pre_copy: bool
    post_copy: bool
    reasons: dict[str, str] = field(default_factory=dict)  # strategy -> why not
    network_lock: str = ""  # what Checkpointer(network_lock=...) should use: "nftables", "iptables", or "" (none)
    tls: bool = False  # the page server can run over TLS
    tls_detail: str = ""

    def strategies(self) -> list[str]:
        """The live strategies available here, safest first. Which is fastest depends on the
        container: stop-and-copy for small memory (measured here: ~300 ms freeze to running
        across hosts, against ~500 ms for post-copy), post-copy for large or busy memory. Only
        stop-and-copy and pre-copy can roll back to the source after a failure; post-copy
        cannot once the destination has run (its memory is then split between the hosts)."""
        ranked = [(STOP_AND_COPY, self.stop_and_copy), (PRE_COPY, self.pre_copy), (POST_COPY, self.post_copy)]
        return [name for name, ok in ranked if ok]


def _has_capability(bit: int) -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError):
        pass
    return False


def _pipe_max_size() -> int | None:
    try:
        return int(PIPE_MAX_SIZE_FILE.read_text().strip())
    except (OSError, ValueError):
        return None


def _iptables_lock_available() -> bool:
    return all(shutil.which(tool, path=DEFAULT_PATH) for tool in ("iptables-restore", "ip6tables-restore"))


async def probe_live_support() -> LiveSupport:
    status = await check_criu()
    if not status.ok:
        why = f"CRIU is not usable here: {status.detail}"
        reasons = {s: why for s in (STOP_AND_COPY, PRE_COPY, POST_COPY)}
        return LiveSupport(False, status.version, status.detail, False, False, False, reasons)

    dirty, uffd, nft, tls = await asyncio.gather(
        check_feature("mem_dirty_track"),
        check_feature("uffd-noncoop"),
        check_feature("network_lock_nftables"),
        check_feature("mnt_id", "--tls"),
    )
    reasons: dict[str, str] = {}

    # nftables first: CRIU locks and unlocks through libnftables in-process instead of running
    # iptables-restore and ip6tables-restore; measured here, ~25 ms less per restore.
    if nft.supported:
        network_lock = "nftables"
    elif _iptables_lock_available():
        network_lock = "iptables"
    else:
        network_lock = ""
        reasons[STOP_AND_COPY] = (
            "no network lock: iptables-restore/ip6tables-restore are not installed "
            f"and CRIU's nftables lock is not supported ({nft.detail})"
        )

    if not dirty.supported:
        reasons[PRE_COPY] = (
            "kernel has no memory dirty tracking (criu check --feature mem_dirty_track: "
            f"{dirty.detail}); needs CONFIG_MEM_SOFT_DIRTY"
        )

    post_copy_why = []
    if not uffd.supported:
        post_copy_why.append(f"no non-cooperative userfaultfd (criu check --feature uffd-noncoop: {uffd.detail})")
    if not _has_capability(CAP_SYS_RESOURCE):
        pipe_max, needed = _pipe_max_size(), pipe_bytes_needed()
        if pipe_max is None or pipe_max < needed:
            post_copy_why.append(
                f"fs.pipe-max-size is {pipe_max if pipe_max is not None else 'unreadable'}, needs >= {needed} "
                "(no CAP_SYS_RESOURCE: CRIU's page server cannot grow its pipe to 819 pages)"
            )
    if not network_lock:
        post_copy_why.append("no network lock (see stop-and-copy)")
    if post_copy_why:
        reasons[POST_COPY] = "; ".join(post_copy_why)
    if network_lock == "" and PRE_COPY not in reasons:
        reasons[PRE_COPY] = "no network lock (see stop-and-copy)"

    support = LiveSupport(
        criu_ok=True,
        criu_version=status.version,
        detail="",
        stop_and_copy=STOP_AND_COPY not in reasons,
        pre_copy=PRE_COPY not in reasons,
        post_copy=POST_COPY not in reasons,
        reasons=reasons,
        network_lock=network_lock,
        tls=tls.supported,
        tls_detail="" if tls.supported else tls.detail,
    )
    log.info("live migration support probed", strategies=support.strategies(), reasons=reasons,
             network_lock=network_lock, tls=support.tls)  # fmt: skip
    return support
