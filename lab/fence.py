"""The lab's fence agent: `python -m lab.fence --lab NAME NODE`.

Powers lab host NODE off exactly as `corral lab kill NODE` (lab.faults.power_off)
and checks that nothing of it runs any more. Exit 0 only then (also when it was
already off: fencing is idempotent, as an IPMI power-off is); otherwise non-zero
and one line on stderr saying why: 2 bad arguments, 3 no such lab or node,
10 something of the host still runs. As a controller's fence command line:
`PYTHON -m lab.fence --lab NAME {node}` (lab.faults.fence_command builds it),
run from anywhere: the repository is found from this file.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lab.fence",
        description="Power a lab host off (SIGKILL its agent and every process of its containers; "
                    "files stay) and exit 0 only once nothing of it runs.")
    parser.add_argument("--lab", default="demo", help="lab name (default: demo)")
    parser.add_argument("--base-dir", type=Path, default=None, help="the lab's directory, if not the default")
    parser.add_argument("node", metavar="NODE", help="lab node to fence: n1, n2, ...")
    args = parser.parse_args(argv)

    from corral import log
    from corral.errors import CorralError
    from lab.faults import power_off

    log.configure(json_output=False, level="warning")  # stdout holds the verdict alone

    try:
        report = asyncio.run(power_off(args.lab, args.node, args.base_dir))
    except CorralError as e:
        print(f"lab.fence: cannot fence {args.node} of lab {args.lab}: {e}", file=sys.stderr)
        return e.exit_code or 1
    print(f"fenced: {report.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
