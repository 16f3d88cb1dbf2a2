"""SSH keys of the transfer channel: one-time operation keys and the host's own key.

Only ed25519 is used or accepted: the keys are ours (the controller makes the
operation key, the agent makes its host key), so there is nothing to negotiate.
"""

from __future__ import annotations

import os
from pathlib import Path

import asyncssh

from corral.errors import InvalidArgument, RuntimeFailure

KEY_ALGORITHM = "ssh-ed25519"


def new_operation_keypair(comment: str = "corral-operation") -> tuple[str, str]:
    """A fresh key for one operation: (private key, OpenSSH PEM; public key line)."""
    key = asyncssh.generate_private_key(KEY_ALGORITHM, comment=comment)
    return key.export_private_key().decode(), key.export_public_key().decode().strip()


def parse_public_key(line: str, what: str = "public key") -> asyncssh.SSHKey:
    """An OpenSSH public key line ("ssh-ed25519 AAAA... [comment]"), ed25519 only."""
    if not isinstance(line, str) or not line.strip() or "\n" in line.strip():
        raise InvalidArgument(f"{what} must be one OpenSSH public key line")
    try:
        key = asyncssh.import_public_key(line.strip())
    except (asyncssh.KeyImportError, ValueError) as e:
        raise InvalidArgument(f"{what} is not a valid OpenSSH public key: {e}") from None
    if key.algorithm.decode() != KEY_ALGORITHM:
        raise InvalidArgument(f"{what} must be {KEY_ALGORITHM}, not {key.algorithm.decode()}")
    return key


def public_key_line(key: asyncssh.SSHKey) -> str:
    """'ssh-ed25519 AAAA...' without a comment: the form pinned in known_hosts."""
    algorithm, blob = key.export_public_key("openssh").decode().split()[:2]
    return f"{algorithm} {blob}"


def load_or_create_host_key(path: Path) -> asyncssh.SSHKey:
    """The host's transfer key at `path` (0600), made on first use.

    Blocking (file I/O): call it from a thread when on the event loop."""
    path = Path(path)
    if path.exists():
        return _load_host_key(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = asyncssh.generate_private_key(KEY_ALGORITHM, comment="corral-transfer-host")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key.export_private_key())
            f.flush()
            os.fsync(f.fileno())
        try:
            # link, not rename: if another process made the key meanwhile, keep its key.
            os.link(tmp, path)
        except FileExistsError:
            return _load_host_key(path)
    finally:
        tmp.unlink(missing_ok=True)
    return key


def _load_host_key(path: Path) -> asyncssh.SSHKey:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        # A host key others can read is no secret: tighten it rather than serve it.
        os.chmod(path, 0o600)
    try:
        key = asyncssh.read_private_key(path)
    except (asyncssh.KeyImportError, OSError, ValueError) as e:
        raise RuntimeFailure(f"transfer host key {path} cannot be read: {e}") from None
    if key.algorithm.decode() != KEY_ALGORITHM:
        raise RuntimeFailure(f"transfer host key {path} is {key.algorithm.decode()}, expected {KEY_ALGORITHM}")
    return key
