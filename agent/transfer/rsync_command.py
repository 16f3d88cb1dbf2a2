"""The one command a transfer credential may run: our own client's `rsync --server`.

What an SSH client asks to exec is untrusted text. It is accepted only if it is
exactly what `agent.transfer.client.rsync_push` makes rsync send (captured in
tests/test_transfer.py), e.g.

    rsync --server -lHogDtpAXrSe.iLsfxCIvu --timeout=60 --delete --stats --numeric-ids . rootfs/

and then run from an argument list we build, never through a shell.

Why each accepted option is harmless on the receiving side:
  short flags l H o g D t p A X r S  -a's parts plus hard links, ACLs, xattrs and
      sparse files: they say *what* to preserve, never *where* to write;
  e.<letters>   not a shell in server mode: the client's protocol capabilities;
  --delete      deletes only inside the destination, which is inside staging;
  --numeric-ids, --stats   no paths involved;
  --timeout=N   an I/O timeout, bounded.
Everything else is refused, in particular: --sender and -s/--secluded-args
(reading, or arguments we could not see), options naming another path
(-T/--temp-dir, --backup-dir, --partial-dir, --log-file, --compare-dest,
--copy-dest, --link-dest, --files-from, --exclude-from, --include-from,
--write-batch, --read-batch, --rsync-path...), -K/-L/-k (following symlinks on
the receiver), filters (-f, --filter, --exclude...), and any quoting or shell
syntax (the accepted alphabet has no quotes, backslashes or metacharacters).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from corral.errors import PermissionDenied

MAX_COMMAND_LENGTH = 1024
MAX_TIMEOUT = 86400

# Short flags our client's invocation produces in server mode (see module docstring).
ALLOWED_SHORT_FLAGS = frozenset("lHogDtpAXrS")
_FLAG_CLUSTER = re.compile(r"^-([A-Za-z]+)(?:e(\.[A-Za-z]*))?$")
_LONG_FLAGS = frozenset({"--delete", "--numeric-ids", "--stats"})
_TIMEOUT = re.compile(r"^--timeout=([1-9][0-9]{0,5})$")
_SAFE_TEXT = re.compile(r"^[A-Za-z0-9 ._=/-]+$")
_PATH_COMPONENT = re.compile(r"^[A-Za-z0-9._-]{1,255}$")
_PATH_OPTIONS = (
    "--temp-dir", "--backup-dir", "--partial-dir", "--log-file", "--compare-dest", "--copy-dest",
    "--link-dest", "--files-from", "--exclude-from", "--include-from", "--write-batch",
    "--read-batch", "--only-write-batch", "--rsync-path", "--filter", "--exclude", "--include",
    "--daemon", "--config", "--mkpath", "--keep-dirlinks", "--copy-links", "--copy-dirlinks",
)  # fmt: skip


class CommandRefused(PermissionDenied):
    """The exec'd command is not one this channel runs; `message` says why."""


@dataclass(frozen=True)
class RsyncServerCommand:
    options: tuple[str, ...]  # validated, in the order received
    destination: str  # relative to the grant's staging directory, as received

    def argv(self, rsync: str, destination: Path) -> list[str]:
        """The command to run, with the destination already resolved by `resolve_destination`."""
        suffix = "/" if self.destination.endswith("/") else ""
        return [rsync, "--server", *self.options, ".", f"{destination}{suffix}"]


def parse_rsync_server_command(command: str | None) -> RsyncServerCommand:
    """Accept only a receiving `rsync --server` command in our client's shape."""
    if command is None:
        raise CommandRefused("no shell: this endpoint only runs rsync receiving")
    if len(command) > MAX_COMMAND_LENGTH:
        raise CommandRefused(f"command is longer than {MAX_COMMAND_LENGTH} characters")
    if not _SAFE_TEXT.match(command):
        raise CommandRefused("command contains characters this endpoint does not accept (quotes, shell syntax)")
    words = command.split(" ")
    if "" in words:
        raise CommandRefused("command has empty arguments (repeated or edge spaces)")
    if words[0] != "rsync":
        raise CommandRefused(f"only rsync may run here, not {words[0]!r}")
    if len(words) < 2 or words[1] != "--server":
        raise CommandRefused("only `rsync --server` (receiving) may run here")
    if "--sender" in words:
        raise CommandRefused("reading is not allowed (--sender): this credential may only write")
    dot = words.index(".", 2) if "." in words[2:] else len(words)
    options = words[2:dot]
    _check_options(options)
    if dot == len(words):
        raise CommandRefused("command lacks the '. DESTINATION' arguments of rsync --server")
    arguments = words[dot + 1 :]
    if len(arguments) != 1:
        raise CommandRefused(f"expected exactly one destination, got {len(arguments)}")
    destination = arguments[0]
    _check_destination_text(destination)
    return RsyncServerCommand(tuple(options), destination)


def resolve_destination(staging: Path, destination: str) -> Path:
    """The real path `destination` names inside `staging`; refused if it leaves staging
    (lexically or through a symlink that is already there)."""
    _check_destination_text(destination)
    root = Path(os.path.realpath(staging))
    resolved = Path(os.path.realpath(root / destination.rstrip("/")))
    if resolved == root or not resolved.is_relative_to(root):
        raise CommandRefused(f"destination {destination!r} leads outside the operation's staging directory")
    return resolved


def _check_options(options: list[str]) -> None:
    seen: set[str] = set()
    clusters = 0
    for option in options:
        if option.startswith("--"):
            key = option.split("=", 1)[0]
            if key in seen:
                raise CommandRefused(f"option {key} given twice")
            seen.add(key)
            if option in _LONG_FLAGS or _TIMEOUT.fullmatch(option):
                if option.startswith("--timeout") and int(option.split("=", 1)[1]) > MAX_TIMEOUT:
                    raise CommandRefused(f"--timeout above {MAX_TIMEOUT} s")
                continue
            if option.startswith(_PATH_OPTIONS):
                raise CommandRefused(f"option {key} is not allowed: it names another path or changes what is read")
            raise CommandRefused(f"option {key} is not allowed on this channel")
        match = _FLAG_CLUSTER.fullmatch(option)
        if not match:
            raise CommandRefused(f"malformed option {option!r}")
        clusters += 1
        flags = match.group(1)
        if match.group(2) is None and "e" in flags:
            raise CommandRefused(f"malformed option {option!r}")
        bad = sorted(set(flags) - ALLOWED_SHORT_FLAGS)
        if bad:
            if "s" in bad:
                raise CommandRefused("secluded arguments (-s) are not allowed: every argument must be visible")
            raise CommandRefused(f"short option(s) -{''.join(bad)} not allowed on this channel")
    if clusters > 1:
        raise CommandRefused("more than one short-option cluster")


def _check_destination_text(destination: str) -> None:
    if destination.startswith("/"):
        raise CommandRefused(f"destination {destination!r} is absolute: give a path inside the staging directory")
    components = destination.rstrip("/").split("/")
    for c in components:
        if c in ("", ".", "..") or not _PATH_COMPONENT.match(c):
            raise CommandRefused(f"destination {destination!r} is not a plain relative path (no '.', '..' or '//')")
