"""Which agent versions a controller accepts (version skew during a rolling upgrade).

The rule, pure: an agent is compatible when its major version equals the controller's
and its minor is the controller's or one less; the patch level is ignored. An agent
newer than its controller is refused (the controller cannot know what it expects), and
so is one whose version is unknown or cannot be parsed. Upgrade the controller first,
then the agents, one minor at a time.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

# MAJOR.MINOR[.PATCH], optionally followed by a pre-release or local part (ignored with the patch).
_VERSION = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?(?:[-+.a-zA-Z0-9]*)?$")


@dataclass(frozen=True)
class Compatibility:
    ok: bool
    reason: str  # why it is (not) accepted, one sentence that names both versions

    def __bool__(self) -> bool:
        return self.ok


def parse(version: str) -> tuple[int, int] | None:
    """(major, minor) of a version string, or None if it is not MAJOR.MINOR[.PATCH...]."""
    match = _VERSION.match(version.strip())
    return (int(match.group(1)), int(match.group(2))) if match else None


def agent_compatibility(agent: str, controller: str) -> Compatibility:
    """Whether a controller at version `controller` accepts an agent at version `agent`."""
    theirs, ours = parse(agent or ""), parse(controller or "")
    if ours is None:
        return Compatibility(False, f"the controller's own version {controller!r} cannot be parsed")
    supported = f"{ours[0]}.{ours[1]}" if ours[1] == 0 else f"{ours[0]}.{ours[1] - 1} or {ours[0]}.{ours[1]}"
    wanted = f"this controller ({controller}) accepts agents {supported}"
    if theirs is None:
        return Compatibility(False, f"agent version {agent or 'unknown'!r} is not a version; {wanted}")
    if theirs[0] != ours[0]:
        return Compatibility(False, f"agent version {agent} has another major version; {wanted}")
    if theirs[1] > ours[1]:
        return Compatibility(False, f"agent version {agent} is newer than the controller; "
                                    f"upgrade the controller first; {wanted}")  # fmt: skip
    if theirs[1] < ours[1] - 1:
        return Compatibility(False, f"agent version {agent} is more than one minor version older; "
                                    f"upgrade the agent; {wanted}")  # fmt: skip
    return Compatibility(True, f"agent version {agent} is compatible; {wanted}")


@functools.cache
def controller_version() -> str:
    """The version this controller speaks for: the installed package's (pyproject.toml)."""
    from corral.version import package_version

    return package_version()
