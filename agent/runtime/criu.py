"""What CRIU can do on this host (`criu check`)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from corral import proc
from corral.errors import CorralError
from agent.runtime.lxc import DEFAULT_PATH


@dataclass(frozen=True)
class CriuStatus:
    version: str
    ok: bool
    detail: str


async def check_criu() -> CriuStatus:
    criu = shutil.which("criu", path=DEFAULT_PATH)
    if criu is None:
        return CriuStatus("", False, "criu is not installed")
    try:
        version = await proc.run([criu, "--version"], timeout=10, check=False)
        check = await proc.run([criu, "check"], timeout=30, check=False)
    except CorralError as exc:
        return CriuStatus("", False, exc.message)
    text = version.stdout.decode()
    ver = text.split("Version:", 1)[1].split()[0] if "Version:" in text else text.strip()
    if check.returncode == 0:
        return CriuStatus(ver, True, "")
    last = (check.stderr or check.stdout).decode(errors="replace").strip().splitlines()
    return CriuStatus(ver, False, last[-1] if last else f"criu check exited {check.returncode}")
