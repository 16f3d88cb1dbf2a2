"""Running under systemd: readiness notification, and the check of a daemon's configuration.

`notify` speaks sd_notify's datagram protocol (systemd's sd_notify(3)) without libsystemd: one
datagram of newline-separated assignments (`READY=1`, `STOPPING=1`, `STATUS=...`) sent to the
AF_UNIX socket named by $NOTIFY_SOCKET, a path or, starting with `@`, an abstract name. With
$NOTIFY_SOCKET unset (not started by systemd, or Type= is not notify) it does nothing. A failure
to notify never stops a daemon: it is logged and reported as False.

`check_config` is what `corral-agent --check-config` and `corral-controller --check-config` run
(the units in deploy/systemd/ and the guide deploy/GUIDE.md): load the configuration with the
daemon's own loader, then what the loader does not look at: the certificate files parse, the
key is the certificate's, the CA signed it, it is valid now and names the daemon's role and
name, and each listen address is one of this host's. Nothing is started.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import structlog

from corral.config import TlsFiles
from corral.errors import ConfigError, CorralError

log = structlog.get_logger("corral.systemd")

NOTIFY_SOCKET = "NOTIFY_SOCKET"
T = TypeVar("T")


def notify(*assignments: str) -> bool:
    """Send `assignments` (each `KEY=VALUE`) to systemd; False when there is no one to tell."""
    address = os.environ.get(NOTIFY_SOCKET, "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # Linux's abstract namespace
    elif not address.startswith("/"):
        log.warning("NOTIFY_SOCKET is neither a path nor an abstract socket name: not notifying", address=address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(assignments).encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd", address=address.replace("\0", "@"), error=exc.strerror)
        return False
    return True


def ready(status: str = "") -> bool:
    """The daemon serves: `systemctl start` returns and units ordered after it start."""
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def stopping(status: str = "") -> bool:
    """The daemon was asked to stop and is winding down."""
    return notify("STOPPING=1", *([f"STATUS={status}"] if status else []))


def status(text: str) -> bool:
    """One line for `systemctl status`."""
    return notify(f"STATUS={text}")


# -- --check-config ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Checked:
    """What a daemon's check needs from its loaded configuration."""

    tls: TlsFiles
    listen: Iterable[str]
    role: str  # the role (OU) and name (CN) its certificate must carry
    name: str
    summary: str


def check_config(prog: str, path: Path, load: Callable[[Path], T], facts: Callable[[T], Checked]) -> int:
    """Load and check the configuration at `path`; print `config OK: ...` (stdout) or the error
    (stderr) and return the exit code: 0, or the config error's (78, EX_CONFIG)."""
    try:
        checked = facts(load(path))
        expiry = _check_certificates(path, checked)
        for address in checked.listen:
            _check_listen(path, address)
    except CorralError as exc:
        print(f"{prog}: {exc.message}", file=sys.stderr)
        return ConfigError.exit_code
    print(f"config OK: {checked.summary}; certificate {checked.role} {checked.name!r} valid until {expiry}")
    return 0


def _check_certificates(path: Path, checked: Checked) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from corral.pki import identity_from_pem

    def fail(key: str, file: Path, why: str) -> ConfigError:
        return ConfigError(f"{path}: tls.{key}: {file}: {why}")

    tls = checked.tls
    try:
        cas = x509.load_pem_x509_certificates(tls.ca.read_bytes())
    except (OSError, ValueError) as exc:
        raise fail("ca", tls.ca, f"not a PEM certificate ({exc})") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem := tls.cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise fail("cert", tls.cert, f"not a PEM certificate ({exc})") from None
    try:
        key = serialization.load_pem_private_key(tls.key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise fail("key", tls.key, f"not an unencrypted PEM private key ({exc})") from None
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise fail("key", tls.key, f"is not the key of the certificate {tls.cert}")
    if not any(_signed_by(cert, ca) for ca in cas):
        raise fail("cert", tls.cert, f"not signed by the CA in {tls.ca} (a certificate of another fleet?)")
    now = datetime.datetime.now(datetime.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise fail("cert", tls.cert, f"not valid now (valid from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
                                     f"to {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)")  # fmt: skip
    try:
        who = identity_from_pem(cert_pem)
    except CorralError as exc:
        raise fail("cert", tls.cert, exc.message) from None
    if (who.role, who.name) != (checked.role, checked.name):
        raise fail("cert", tls.cert, f"issued to {who.role} {who.name!r}, not to {checked.role} {checked.name!r} "
                                     f"(corral pki issue --role {checked.role} --name {checked.name})")  # fmt: skip
    left = (cert.not_valid_after_utc - now).days
    # Still OK (the daemon can start), but said where the operator looks: corral.certwatch.
    soon = f" ({left} days left: corral pki renew --role {who.role} --name {who.name})" if left < 30 else ""
    return f"{cert.not_valid_after_utc:%Y-%m-%d}{soon}"


def _signed_by(cert, ca) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):  # another issuer, another key type, a bad signature
        return False
    return True


def _check_listen(path: Path, address: str) -> None:
    """The host of HOST:PORT resolves to an address this host has (binding it to port 0 says so;
    its own port may well be in use by the running daemon)."""
    host, _, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"{path}: listen {address}: cannot resolve {host!r} ({exc})") from None
    family, _, _, _, sockaddr = infos[0]
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((sockaddr[0], 0, *sockaddr[2:]))
    except OSError as exc:
        raise ConfigError(f"{path}: listen {address}: {sockaddr[0]} is not an address of this host "
                          f"({exc.strerror})") from None  # fmt: skip
