"""The host's CRIU binary: where it is, its version, and `criu check`."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from agent.runtime.lxc import DEFAULT_PATH
from corral import proc
from corral.errors import CorralError

CHECK_TIMEOUT = 30.0


@dataclass(frozen=True)
class CriuStatus:
    version: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class FeatureCheck:
    supported: bool
    detail: str  # CRIU's own words (its last line), for the reasons we report


def criu_binary() -> str | None:
    """The criu lxc-checkpoint will run: LXC looks it up on PATH, so do we (same PATH as the agent)."""
    return shutil.which("criu", path=DEFAULT_PATH)


def _last_line(done: proc.Completed) -> str:
    lines = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
    return lines[-1].strip() if lines else f"exit {done.returncode}"


async def check_criu() -> CriuStatus:
    criu = criu_binary()
    if criu is None:
        return CriuStatus("", False, "criu is not installed")
    try:
        version = await proc.run([criu, "--version"], timeout=10, check=False)
        check = await proc.run([criu, "check"], timeout=CHECK_TIMEOUT, check=False)
    except CorralError as exc:
        return CriuStatus("", False, exc.message)
    text = version.stdout.decode()
    ver = text.split("Version:", 1)[1].split()[0] if "Version:" in text else text.strip()
    if check.returncode == 0:
        return CriuStatus(ver, True, "")
    return CriuStatus(ver, False, _last_line(check))


async def check_feature(feature: str, *extra: str) -> FeatureCheck:
    """`criu [extra] check --feature FEATURE`: exit 0 means supported."""
    criu = criu_binary()
    if criu is None:
        return FeatureCheck(False, "criu is not installed")
    try:
        done = await proc.run([criu, *extra, "check", "--feature", feature], timeout=CHECK_TIMEOUT, check=False)
    except CorralError as exc:
        return FeatureCheck(False, exc.message)
    return FeatureCheck(done.returncode == 0, _last_line(done))
