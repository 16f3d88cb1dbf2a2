"""Launcher for detached daemons: `python -m lab.spawn LOG CWD -- CMD...`.

Starts CMD in a new session, stdin from /dev/null, stdout and stderr appended
to LOG, prints its PID and exits at once, so the daemon is re-parented away
from whoever launched it.

Why a launcher instead of `asyncio.create_subprocess_exec` straight away: an
asyncio subprocess transport SIGKILLs its child when it is closed or garbage
collected (BaseSubprocessTransport.close), e.g. when the `corral lab up`
process exits. The lab's daemons must outlive the process that started them.
"""

from __future__ import annotations

import subprocess
import sys

from corral.programs import check_argv


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: python -m lab.spawn LOG CWD -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    log_path, cwd, cmd = argv[0], argv[1], argv[3:]
    check_argv(cmd)
    with open(log_path, "ab", buffering=0) as log:
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as e:
            print(f"cannot start {cmd[0]}: {e}", file=sys.stderr)
            return 127
    print(proc.pid, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
