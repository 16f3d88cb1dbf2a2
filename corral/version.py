"""Corral's version, from the installed package's metadata (pyproject.toml's version).
Read only when asked (`--version`): importlib.metadata is not free."""

from __future__ import annotations

import argparse
import sys

DISTRIBUTION = "corral"


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown (not installed)"


class VersionAction(argparse.Action):
    """`--version` for the daemons' argparse: prints `PROG VERSION` on stdout and exits 0."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="print the version and exit"):  # fmt: skip
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        sys.stdout.write(f"{parser.prog} {package_version()}\n")
        parser.exit()
