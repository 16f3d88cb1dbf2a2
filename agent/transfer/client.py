"""The pushing side: rsync over OpenSSH's `ssh` to a destination agent's TransferServer.

The operation's private key and the destination's pinned host key go into a
private temporary directory for the length of one push (removed afterwards, also
on cancel). ssh reads no config file, no agent and no other known_hosts: the push
reaches the pinned host with the one credential or fails.

rsync options, and why (the destination accepts exactly these, rsync_command.py):
  -a            recursion, symlinks, permissions, times, owner, group, devices and
                specials (a container rootfs has /dev nodes and fifos);
  -H            hard links are common in a rootfs (e.g. coreutils, perl);
  --numeric-ids ids are the container's (shifted) ids, never mapped through names;
  -A, -X        ACLs and xattrs: file capabilities (security.capability, e.g. ping)
                live in xattrs; both ends are root, both rsyncs support them;
  -S            sparse files stay sparse (e.g. /var/log/lastlog);
  --delete      repeated passes (pre-copy, then the final pass) converge exactly;
  --timeout     an I/O timeout, so a dead peer ends the push;
  --stats --info=progress2   totals and progress, parsed here.
No --inplace: rsync then writes each file to a temporary name and renames it, so
a file is never half old, half new; and inplace would rewrite hard-linked peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shlex
import shutil
import signal
import stat
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import structlog

from agent.transfer.keys import parse_public_key, public_key_line
from corral.errors import (
    CorralError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RuntimeFailure,
    Unauthenticated,
    Unavailable,
)
from corral.programs import check_argv

log = structlog.get_logger("corral.agent.transfer")

CIPHERS = "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com"
CONNECT_TIMEOUT = 10  # seconds, ssh's TCP connect + banner
IO_TIMEOUT = 60  # seconds without data before rsync gives up (--timeout)
# The pushes of one operation share one SSH connection (OpenSSH multiplexing): the
# key exchange and authentication, ~80 ms here, are paid once, not during the
# downtime of a live migration. The master connection lingers this long when idle.
CONTROL_PERSIST = 60
# Where sessions live: the agent points this into its own state directory at start
# (use_session_root); the default in /tmp serves tools and tests. Either way it is used
# only if it is a private directory of ours (_private_dir).
SESSION_ROOT = Path(tempfile.gettempdir()) / "corral-push-sessions"
_SUN_PATH_MAX = 107  # a unix socket path's limit; ssh binds the ControlPath plus a 17-byte suffix first
PROGRESS_INTERVAL = 0.1  # at most this often to the progress callback
_USER = re.compile(r"^[a-z0-9][a-z0-9-]{0,70}$")
_SUBDIR_COMPONENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}$")
_PROGRESS = re.compile(
    r"^\s*([\d,]+)\s+(\d+)%\s+([\d.]+)([kMGT]?)B/s\s+\d+:\d\d:\d\d"
    r"(?:\s+\(xfr#\d+,\s+(ir|to)-chk=\d+/\d+\))?"
)
_UNREACHABLE = re.compile(
    r"Connection refused|No route to host|timed out|Could not resolve|Network is unreachable|"
    r"Connection reset|Connection closed"
)
_UNITS = {"": 1, "k": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
# rsync exit codes (rsync(1), EXIT VALUES) for error messages.
_RSYNC_EXIT = {
    1: "syntax or usage error", 2: "protocol incompatibility", 3: "errors selecting input/output files",
    5: "error starting the client-server protocol", 10: "socket I/O error", 11: "file I/O error",
    12: "protocol data stream error", 13: "program diagnostics error", 14: "IPC error",
    20: "killed by a signal", 22: "memory allocation failed", 23: "partial transfer due to errors",
    24: "some source files vanished", 25: "--max-delete stopped deletions", 30: "timeout in data send/receive",
    35: "timeout waiting for a daemon connection", 255: "ssh failed",
}  # fmt: skip


@dataclass(frozen=True)
class PushTarget:
    address: str  # "host:port" of the destination's TransferServer
    user: str  # "op-<op_id>"
    host_key: str  # expected public host key (OpenSSH line); anything else = refuse
    private_key: str  # the operation's private key (OpenSSH PEM)

    def __repr__(self) -> str:  # never print the private key
        return f"PushTarget(address={self.address!r}, user={self.user!r})"


@dataclass(frozen=True)
class TransferProgress:
    bytes_done: int  # size of the files rsync has dealt with so far (not wire bytes)
    bytes_total: int  # rsync's current estimate; grows while it is still scanning
    rate_bps: float
    eta_s: float | None  # None while rsync is still scanning (the total is not known)


@dataclass(frozen=True)
class TransferStats:
    bytes_sent: int  # what crossed the wire ("Total bytes sent")
    literal_bytes: int  # file data that had to be sent ("Literal data"): the delta
    total_size: int  # size of the whole tree ("Total file size")
    files_transferred: int  # regular files sent ("Number of regular files transferred")
    duration_s: float


async def rsync_push(
    src_dir: Path,
    target: PushTarget,
    dest_subdir: str,
    *,
    progress: Callable[[TransferProgress], None] | None = None,
    timeout: float,
    delete: bool = True,
    acls: bool = True,
    xattrs: bool = True,
) -> TransferStats:
    """Make `dest_subdir` (inside the destination's staging directory for this
    operation) a copy of `src_dir`. Cancel-safe: rsync and ssh are killed."""
    src = Path(os.path.abspath(src_dir))
    dest_subdir = validate_dest_subdir(dest_subdir)
    host, port = split_address(target.address)
    if not _USER.fullmatch(target.user or ""):
        raise InvalidArgument(f"transfer user {target.user!r} is invalid")
    if not src.is_dir():
        raise NotFound(f"nothing to send: {src} is not a directory")
    rsync, ssh = _binary("rsync"), _binary("ssh")
    plog = log.bind(op=target.user.removeprefix("op-"), user=target.user, address=target.address, dest=dest_subdir)
    began = time.monotonic()
    with session_files(target) as (key_file, known_hosts, control_path):
        ssh_command = " ".join(
            shlex.quote(a) for a in ssh_argv(key_file, known_hosts, port, ssh=ssh, control_path=control_path)
        )
        remote = f"{target.user}@{_rsync_host(host)}:{dest_subdir}/"
        argv = rsync_argv(rsync, src, remote, ssh_command, delete=delete, acls=acls, xattrs=xattrs)
        plog.info("push started", src=str(src))
        returncode, out_lines, err_text = await _run(argv, timeout, _ProgressParser(progress))
    duration = time.monotonic() - began
    error = _error_for(returncode, err_text)
    if error is not None:
        plog.warning("push failed", exit_code=returncode, error=error.message)
        raise error
    if returncode == 24:
        plog.warning("some source files vanished during the push", stderr=err_text[-500:])
    stats = parse_stats(out_lines, duration)
    if progress is not None:
        _call(progress, TransferProgress(stats.total_size, stats.total_size,
                                         stats.total_size / duration if duration > 0 else 0.0, 0.0))  # fmt: skip
    plog.info("push finished", bytes_sent=stats.bytes_sent, literal=stats.literal_bytes,
              total=stats.total_size, files=stats.files_transferred, s=round(duration, 3))  # fmt: skip
    return stats


# -- building the command ------------------------------------------------------------


def validate_dest_subdir(dest_subdir: str) -> str:
    """A plain relative path inside the staging directory, e.g. 'rootfs'."""
    if not isinstance(dest_subdir, str):
        raise InvalidArgument("destination must be a relative path")
    parts = dest_subdir.strip("/").split("/")
    if dest_subdir.startswith("/") or not all(_SUBDIR_COMPONENT.fullmatch(p) and p not in (".", "..") for p in parts):
        raise InvalidArgument(f"destination {dest_subdir!r} must be a plain relative path (no '..', no leading '/')")
    return "/".join(parts)


def split_address(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    host, sep, port_text = (address or "").rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not (0 < int(port_text) < 65536):
        raise InvalidArgument(f"transfer address {address!r} must be host:port")
    if not re.fullmatch(r"[A-Za-z0-9.:-]+", host) or host.startswith("-"):
        raise InvalidArgument(f"transfer host {host!r} is invalid")
    return host, int(port_text)


def known_hosts_line(host: str, port: int, host_key: str) -> str:
    name = host if port == 22 else f"[{host}]:{port}"
    return f"{name} {public_key_line(parse_public_key(host_key, 'the destination host key'))}\n"


@contextlib.contextmanager
def credential_files(target: PushTarget) -> Iterator[tuple[Path, Path]]:
    """(key file, known_hosts file) in a private temporary directory, removed on exit."""
    host, port = split_address(target.address)
    known = known_hosts_line(host, port, target.host_key)
    if "PRIVATE KEY-----" not in (target.private_key or ""):
        raise InvalidArgument("the operation's private key must be an OpenSSH PEM private key")
    tmp = Path(tempfile.mkdtemp(prefix="corral-push-"))  # 0700
    try:
        key_file, known_hosts = tmp / "id", tmp / "known_hosts"
        _write_private(key_file, target.private_key.rstrip("\n") + "\n")
        _write_private(known_hosts, known)
        yield key_file, known_hosts
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def session_files(target: PushTarget) -> Iterator[tuple[Path, Path, Path | None]]:
    """(key file, known_hosts file, control socket path) shared by the pushes of one
    operation to one destination, in a private directory that outlives the push by
    CONTROL_PERSIST (with the master connection); stale ones are swept here."""
    host, port = split_address(target.address)
    known = known_hosts_line(host, port, target.host_key)
    if "PRIVATE KEY-----" not in (target.private_key or ""):
        raise InvalidArgument("the operation's private key must be an OpenSSH PEM private key")
    root = _private_dir(SESSION_ROOT)
    _sweep_sessions(root)
    digest = hashlib.sha256("\0".join([target.user, target.address, target.host_key, target.private_key]).encode())
    session = _private_dir(root / digest.hexdigest()[:20])
    key_file, known_hosts = session / "id", session / "known_hosts"
    if not key_file.exists():
        _write_private(known_hosts, known)
        _write_private(key_file, target.private_key.rstrip("\n") + "\n")
    os.utime(session)
    control = session / "cm"
    # Too long a path for a socket: no shared connection (each push logs in), rather than no push.
    yield key_file, known_hosts, control if len(os.fsencode(control)) + 17 <= _SUN_PATH_MAX else None
    os.utime(session)


def use_session_root(path: Path) -> None:
    """Keep push sessions under `path` (the agent's state directory), made private here."""
    global SESSION_ROOT
    SESSION_ROOT = Path(path)
    _private_dir(SESSION_ROOT)


def _private_dir(path: Path) -> Path:
    """`path` as a directory only we can enter: made here with mode 0700, or, if it is there
    already, used only when it is a real directory (not a symlink) owned by us that no one
    else may read, write or enter. Anything else is refused, not repaired: whoever made it
    could have put their own known_hosts or ControlMaster socket inside."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise FailedPrecondition(f"cannot make the private directory {path} for the transfer's keys: {e.strerror}") from None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
        what = ("a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory" if not stat.S_ISDIR(st.st_mode)
                else f"owned by uid {st.st_uid}" if st.st_uid != os.geteuid()
                else f"open to others (mode {stat.S_IMODE(st.st_mode):04o})")  # fmt: skip
        log.error("refusing an untrusted directory for the transfer's keys", path=str(path), reason=what)
        raise PermissionDenied(f"{path} is {what}: refusing to keep the transfer's keys there (someone "
                               "else may control it); remove it or fix its owner and mode (0700)")  # fmt: skip
    return path


def _sweep_sessions(root: Path) -> None:
    now = time.time()
    for session in root.iterdir():
        with contextlib.suppress(OSError):
            if now - session.stat().st_mtime > 4 * CONTROL_PERSIST:
                shutil.rmtree(session)


def ssh_argv(
    key_file: Path, known_hosts: Path, port: int, *, ssh: str = "ssh", control_path: Path | None = None
) -> list[str]:
    """OpenSSH client for the transfer channel: this key, this pinned host key, nothing else."""
    options = {
        "IdentitiesOnly": "yes", "IdentityAgent": "none", "UserKnownHostsFile": str(known_hosts),
        "GlobalKnownHostsFile": "/dev/null", "StrictHostKeyChecking": "yes", "CheckHostIP": "no",
        "UpdateHostKeys": "no", "HostKeyAlgorithms": "ssh-ed25519", "BatchMode": "yes",
        "PasswordAuthentication": "no", "KbdInteractiveAuthentication": "no",
        "PreferredAuthentications": "publickey",
        "ControlMaster": "auto" if control_path else "no",
        "ControlPath": str(control_path) if control_path else "none",
        "ControlPersist": str(CONTROL_PERSIST) if control_path else "no",
        "ForwardAgent": "no", "ForwardX11": "no", "ClearAllForwardings": "yes", "RequestTTY": "no",
        "Compression": "no", "ConnectTimeout": str(CONNECT_TIMEOUT), "ConnectionAttempts": "1",
        "ServerAliveInterval": "15", "ServerAliveCountMax": "4", "LogLevel": "ERROR",
    }  # fmt: skip
    argv = [ssh, "-F", "/dev/null", "-i", str(key_file)]
    for name, value in options.items():
        argv += ["-o", f"{name}={value}"]
    return [*argv, "-c", CIPHERS, "-p", str(port)]


def rsync_argv(
    rsync: str, src: Path, remote: str, ssh_command: str, *, delete: bool = True, acls: bool = True,
    xattrs: bool = True, io_timeout: int = IO_TIMEOUT,
) -> list[str]:  # fmt: skip
    argv = [rsync, "-a", "-H", "--numeric-ids", "-S"]
    argv += ["-A"] if acls else []
    argv += ["-X"] if xattrs else []
    argv += ["--delete"] if delete else []
    argv += ["--stats", "--info=progress2", f"--timeout={io_timeout}"]
    # -e is the one command string: rsync splits it itself; every element is quoted.
    return [*argv, "-e", ssh_command, "--", f"{src}/", remote]


# -- running it ----------------------------------------------------------------------


async def _run(argv: list[str], timeout: float, parser: _ProgressParser) -> tuple[int, list[str], str]:
    check_argv(argv)
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C"}
    if "HOME" in os.environ:
        env["HOME"] = os.environ["HOME"]  # no RSYNC_* variables: they change what is sent
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True,
    )  # fmt: skip
    lines: deque[str] = deque(maxlen=200)
    errors = bytearray()
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(_read_stdout(proc.stdout, parser, lines), _read_stderr(proc.stderr, errors))
            returncode = await proc.wait()
    except TimeoutError:
        _kill_group(proc)
        await proc.wait()
        raise DeadlineExceeded(f"rsync push did not finish within {timeout:g} s") from None
    except BaseException:  # cancelled (or a reader failed): rsync and ssh must not outlive us
        _kill_group(proc)
        with contextlib.suppress(BaseException):
            async with asyncio.timeout(5):
                await asyncio.shield(proc.wait())
        raise
    return returncode, list(lines), errors.decode(errors="replace")


async def _read_stdout(stream: asyncio.StreamReader, parser: _ProgressParser, lines: deque[str]) -> None:
    pending = b""
    while chunk := await stream.read(65536):
        pending += chunk
        *complete, pending = re.split(rb"[\r\n]", pending)
        for raw in complete:
            line = raw.decode(errors="replace")
            if not parser.feed(line) and line.strip():
                lines.append(line)
    if pending.strip():
        lines.append(pending.decode(errors="replace"))


async def _read_stderr(stream: asyncio.StreamReader, buffer: bytearray) -> None:
    while chunk := await stream.read(65536):
        buffer += chunk
        if len(buffer) > 256 * 1024:  # keep the end: that is where rsync says what went wrong
            del buffer[: len(buffer) - 128 * 1024]


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # rsync and its ssh: one process group


class _ProgressParser:
    """Turns `--info=progress2` lines into TransferProgress calls (rising, rate-limited)."""

    def __init__(self, callback: Callable[[TransferProgress], None] | None) -> None:
        self._callback = callback
        self._last_done = -1
        self._last_emit = 0.0
        self._scanning = True

    def feed(self, line: str) -> bool:
        """True if `line` was a progress line."""
        m = _PROGRESS.match(line)
        if not m:
            return False
        if m.group(5):
            self._scanning = m.group(5) == "ir"
        if self._callback is None:
            return True
        done, percent = int(m.group(1).replace(",", "")), int(m.group(2))
        rate = float(m.group(3)) * _UNITS[m.group(4)]
        now = time.monotonic()
        if done <= self._last_done or now - self._last_emit < PROGRESS_INTERVAL:
            return True
        total = max(done, done * 100 // percent) if percent > 0 else done
        eta = None if self._scanning or rate <= 0 else max(total - done, 0) / rate
        self._last_done, self._last_emit = done, now
        _call(self._callback, TransferProgress(done, total, rate, eta))
        return True


def _call(callback: Callable[[TransferProgress], None], p: TransferProgress) -> None:
    try:
        callback(p)
    except Exception:  # a progress consumer's bug must not fail the transfer
        log.exception("transfer progress callback failed")


# -- results and errors --------------------------------------------------------------


def parse_stats(lines: list[str], duration: float) -> TransferStats:
    def number(label: str) -> int:
        for line in lines:
            if line.startswith(label + ":"):
                m = re.match(r"\s*([\d,]+)", line[len(label) + 1 :])
                if m:
                    return int(m.group(1).replace(",", ""))
        raise RuntimeFailure(f"rsync finished without its statistics ({label!r} missing)")

    return TransferStats(
        bytes_sent=number("Total bytes sent"), literal_bytes=number("Literal data"),
        total_size=number("Total file size"), files_transferred=number("Number of regular files transferred"),
        duration_s=duration,
    )  # fmt: skip


def _error_for(returncode: int, stderr: str) -> CorralError | None:
    """The error a finished rsync means, or None if it succeeded."""
    if returncode in (0, 24):  # 24: files vanished under a running container; the next pass catches up
        return None
    tail = _tail(stderr)
    if "No space left on device" in stderr or "Disk quota exceeded" in stderr:
        return RuntimeFailure(f"the destination ran out of space (No space left on device); nothing was "
                              f"changed on the source. rsync: {tail}")  # fmt: skip
    if "Host key verification failed" in stderr or "HOST IDENTIFICATION HAS CHANGED" in stderr:
        return PermissionDenied("the destination's host key is not the pinned one: refusing to send "
                                "(wrong host or a man in the middle)")  # fmt: skip
    if "Permission denied (publickey" in stderr:
        return Unauthenticated("the destination refused the operation's credential "
                               "(unknown, revoked, expired or replaced key)")  # fmt: skip
    refused = re.search(r"corral: (refused|transfer cut): (.*)", stderr)
    if refused:
        return PermissionDenied(f"the destination {refused.group(1)} the transfer: {refused.group(2).strip()}")
    if returncode == 255 and _UNREACHABLE.search(stderr):
        return Unavailable(f"cannot reach the destination's transfer endpoint: {tail}")
    if returncode in (30, 35):
        return DeadlineExceeded(f"rsync timed out waiting for data ({_RSYNC_EXIT[returncode]}): {tail}")
    meaning = _RSYNC_EXIT.get(returncode, "killed" if returncode < 0 else "unknown error")
    return RuntimeFailure(f"rsync failed (exit {returncode}: {meaning}): {tail}")


def _tail(stderr: str, lines: int = 4) -> str:
    kept = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    return " | ".join(kept[-lines:])[-1000:] or "(no message)"


def _rsync_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise FailedPrecondition(f"{name} is not installed on this host: cannot push files")
    return found


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
