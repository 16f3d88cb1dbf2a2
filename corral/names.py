"""Validation of the names people give to containers and nodes.

A name ends up in paths (the LXC path, storage), in cgroup names and in
interface names, so it is checked before anything is touched.
"""

from __future__ import annotations

import re

from corral.errors import InvalidArgument

MAX_NAME_LENGTH = 63
# Matched with fullmatch: '$' would also match before a trailing newline ("web\n").
_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")


def validate_name(name: str, what: str = "container name") -> str:
    if not isinstance(name, str) or name == "":
        raise InvalidArgument(f"{what} is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument(f"{what} is {len(name)} characters long; at most {MAX_NAME_LENGTH} are allowed")
    if "/" in name or ".." in name or "\\" in name:
        raise InvalidArgument(f"{what} {name!r} contains a path separator or '..'")
    if not name.isascii():
        raise InvalidArgument(f"{what} {name!r} contains non-ASCII characters")
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"{what} {name!r} is invalid: use lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return name


def validate_op_id(op_id: str) -> str:
    """An operation id names directories on the hosts (checkpoints, staging): the same rules as a name."""
    return validate_name(op_id, "operation id")
