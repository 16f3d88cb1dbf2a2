"""Node labels and placement constraints: the operator's words for where containers go.

A host's labels come from its agent's configuration (`labels: {zone: a, ssd: "yes"}`);
a container's constraints (`--constraint zone=a`, `--constraint ssd!=yes`) must all
hold on the node that takes it. Names: lowercase letters, digits, `. _ / -`;
values: letters, digits, `. _ -`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from corral.errors import InvalidArgument

_LABEL = re.compile(r"[a-z0-9]([a-z0-9._/-]{0,61}[a-z0-9])?")
_VALUE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")


@dataclass(frozen=True)
class Constraint:
    """`key=value` (the node's label must be that) or `key!=value` (must not be: a node
    without the label matches)."""

    key: str
    value: str
    equal: bool = True

    @classmethod
    def parse(cls, text: str) -> "Constraint":
        key, op, value = re.split(r"(!=|=)", text, maxsplit=1) if "=" in text else (text, "", "")
        if not op or not _LABEL.fullmatch(key) or not _VALUE.fullmatch(value):
            raise InvalidArgument(f"invalid constraint {text!r}: expected LABEL=VALUE or LABEL!=VALUE "
                                  "(labels: lowercase letters, digits, . _ / -; values: letters, digits, . _ -)")
        return cls(key, value, op == "=")

    def allows(self, labels: Mapping[str, str]) -> bool:
        return (labels.get(self.key) == self.value) == self.equal

    def __str__(self) -> str:
        return f"{self.key}{'=' if self.equal else '!='}{self.value}"


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """A node's labels (from its agent's configuration), checked."""
    for key, value in labels.items():
        if not isinstance(key, str) or not _LABEL.fullmatch(key):
            raise InvalidArgument(f"invalid label name {key!r}: lowercase letters, digits, . _ / -")
        if isinstance(value, (bool, int, float)):
            raise InvalidArgument(f"label {key}: {value!r} is not text; quote it in YAML (\"{value}\")")
        if not isinstance(value, str) or not _VALUE.fullmatch(value):
            raise InvalidArgument(f"invalid value {value!r} for label {key}: letters, digits, . _ -")
    return dict(labels)
