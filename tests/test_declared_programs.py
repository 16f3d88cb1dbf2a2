"""Every program the code runs is declared in corral/programs.py (DESIGN.md rule 7), and a
host missing one reports the capability that needs it as unavailable, with the reason."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

from agent.host_facts import missing_programs
from controller.scheduler.placement import PlacementPolicy, PlacementRequest, why_not
from corral import proc, programs
from corral.model import Limits, Node, NodeFacts, NodeState
from corral.programs import UndeclaredProgram

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("agent", "controller", "corral", "lab", "bench", "tests")

# Calls that run a program, and which positional argument names it when it is a string
# (an argv list among the arguments is always read): which("criu"), _lxc("lxc-info", name),
# on_host(info, node, "sh", "-c", ...).
SPAWNERS = {
    "run": 0, "create_subprocess_exec": 0, "launch": 0, "Popen": 0, "check_output": 0, "check_call": 0,
    "execvp": 0, "execv": 0, "_lxc": 0, "_lvm": 0, "which": 0, "_binary": 0, "_run_tool": 0, "spawn": 0,
    "find": 0, "stream": 0, "host_command": 2, "host_argv": 1, "on_host": 2, "_on_host": 2,
}  # fmt: skip
PROGRAM_LIKE = re.compile(r"^(/[\w./+-]+|[a-z][a-z0-9._+-]*)$")


def _const(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


class ProgramScan(ast.NodeVisitor):
    """Program names in one module: the head of every argv list given to a spawner, assigned
    or returned (`cmd = ["lxc-attach", ...]`), the command after a wrapper's `--`, the element
    after a spread prefix that ends in `--` (`[*enter, "nft", ...]`), and loop variables over
    names used as a program (`for tool in ("iptables-restore", ...): run([*enter, tool])`)."""

    def __init__(self) -> None:
        self.found: set[str] = set()
        self.lists: dict[str, ast.List] = {}
        self.loops: dict[str, list[str]] = {}

    def visit_Assign(self, node: ast.Assign) -> None:
        if isinstance(node.value, ast.List):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    self.lists[target.id] = node.value
        self.generic_visit(node)

    def visit_Return(self, node: ast.Return) -> None:
        if isinstance(node.value, ast.List):
            self._argv(node.value)
        self.generic_visit(node)

    def visit_For(self, node: ast.For) -> None:
        if isinstance(node.target, ast.Name) and isinstance(node.iter, (ast.Tuple, ast.List)):
            names = [c for c in map(_const, node.iter.elts) if c]
            if names:
                self.loops[node.target.id] = names
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name in SPAWNERS and node.args:
            at = SPAWNERS[name]
            if at < len(node.args) and (program := _const(node.args[at])) is not None:
                self.found.add(program)
            for sub in ast.walk(node):
                if isinstance(sub, ast.List):
                    self._argv(sub)
                elif isinstance(sub, ast.Name) and sub.id in self.lists:  # run(cmd), run([*enter, ...])
                    self._argv(self.lists[sub.id])
        self.generic_visit(node)

    def _argv(self, argv: ast.List) -> None:
        elts = argv.elts
        if not elts:
            return
        if (head := _const(elts[0])) is not None:
            self.found.add(head)
        if isinstance(elts[0], ast.Starred) and isinstance(elts[0].value, ast.Name) and len(elts) > 1:
            prefix = self.lists.get(elts[0].value.id)
            if prefix is not None and prefix.elts and _const(prefix.elts[-1]) == "--":
                self._program_at(elts[1])
        for before, after in zip(elts, elts[1:]):
            if _const(before) == "--":
                self._program_at(after)

    def _program_at(self, node: ast.AST) -> None:
        if (name := _const(node)) is not None:
            self.found.add(name)
        elif isinstance(node, ast.Name) and node.id in self.loops:
            self.found.update(self.loops[node.id])


def programs_run_by(source: str) -> set[str]:
    scan = ProgramScan()
    scan.visit(ast.parse(source))
    return {programs.program_name(p) for p in scan.found if PROGRAM_LIKE.match(p)}


def test_every_program_the_source_runs_is_declared():
    undeclared: dict[str, list[str]] = {}
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            if "corral/v1" in path.as_posix() or path.name == Path(__file__).name:
                continue
            for name in programs_run_by(path.read_text()):
                if name not in programs.BY_NAME:
                    undeclared.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert not undeclared, f"run but not declared in corral/programs.py: {undeclared}"


def test_the_scan_sees_the_ways_programs_are_run():
    # Without this, a scan that finds nothing would pass the test above.
    source = '''
enter = ["nsenter", "-t", pid, "-n", "--"]
async def f():
    await proc.run(["lxc-frobnicate", "-n", name], timeout=1)
    await proc.run([*enter, "nft", "list", "tables"], timeout=1)
    for tool in ("iptables-restore", "ip6tables-restore"):
        await proc.run([*enter, tool, "-w"], timeout=1)
    cmd = ["lxc-attach", "-n", name]
    await proc.run(cmd, timeout=1)
    shutil.which("criu")
    await run(["unshare", "--mount", "--", "sleep", "1"], timeout=1)
'''
    assert programs_run_by(source) == {"nsenter", "lxc-frobnicate", "nft", "iptables-restore", "ip6tables-restore",
                                       "lxc-attach", "criu", "unshare", "sleep"}  # fmt: skip


def test_every_declared_program_names_its_package_and_what_needs_it():
    for p in programs.PROGRAMS:
        assert p.package and p.needed_for and p.roles, p
    assert programs.packages([programs.AGENT]), "the agent's packages"
    assert "nftables" in programs.packages([programs.AGENT])


async def test_running_an_undeclared_program_is_refused():
    with pytest.raises(UndeclaredProgram, match="not declared"):
        await proc.run(["frobnicate", "--now"], timeout=5)
    with pytest.raises(UndeclaredProgram, match="frobnicate"):
        await proc.run(["nsenter", "-t", "1", "-n", "--", "frobnicate"], timeout=5)


def test_a_host_without_nft_reports_post_copy_unavailable(tmp_path):
    """A PATH that has every declared program but nft."""
    for p in programs.PROGRAMS:
        found = programs.find(p.name)
        if found and p.name != "nft":
            (tmp_path / p.name).symlink_to(found)
    missing = missing_programs(str(tmp_path))
    assert missing[programs.POST_COPY] == "nft not found (Debian package nftables)"
    assert programs.LIVE_MIGRATION not in missing and programs.CONTAINERS not in missing
    assert missing_programs(os.pathsep.join([str(tmp_path), programs.SEARCH_PATH])).get(programs.POST_COPY) is None


def test_placement_says_why_a_nodes_storage_is_missing():
    facts = NodeFacts(name="n1", address="10.0.0.1:7701", cpus=2, memory_bytes=1 << 30, disk_free_bytes=1 << 30,
                      storage_drivers=("dir",), unavailable={"storage-image": "losetup not found (Debian package mount)"})  # fmt: skip
    node = Node(facts=facts, state=NodeState.READY, last_heartbeat=0.0)
    why = why_not(node, PlacementRequest("web1", Limits(), "", "image"), PlacementPolicy())
    assert why == "no 'image' storage (losetup not found (Debian package mount))"
