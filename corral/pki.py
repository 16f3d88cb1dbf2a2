"""The fleet's certificate authority and its mTLS certificates.

One CA per fleet signs every certificate. A leaf says who its holder is in its
subject: CN is the name (a node name, "controller", a user name) and OU is
the role ("controller", "agent" or "user"); the gRPC auth interceptor reads
both back with `identity_from_pem`.

Servers (the controller, agents) also carry the SAN `server_name(role, name)`, under a
domain no certificate name or host may use: a client checks that name, so the TLS
handshake itself proves the server's role and name. User certificates carry no SAN
and only the clientAuth usage, so TLS refuses one as a server's; a user may not take
the name `controller` or a name another role holds in the same PKI directory.

Files in the PKI directory: `ca.crt`, `ca.key`, and `{role}-{name}.crt/.key`
per leaf. Keys are EC P-256, PKCS#8 PEM, mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from corral.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unauthenticated

ROLES = ("controller", "agent", "user")

CA_CERT = "ca.crt"
CA_KEY = "ca.key"

_CA_VALIDITY = datetime.timedelta(days=3650)
_LEAF_VALIDITY = datetime.timedelta(days=365)
# Back-date a little so a peer whose clock is slightly behind accepts new certs.
_CLOCK_SKEW = datetime.timedelta(minutes=5)

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9.-]{0,62}")

# Role-qualified server names live under this domain; no certificate name or host may.
SERVER_NAME_DOMAIN = "corral.internal"
CONTROLLER_NAME = "controller"


@dataclass(frozen=True)
class CertPaths:
    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class Identity:
    role: str
    name: str


def validate_role(role: str) -> str:
    if role not in ROLES:
        raise InvalidArgument(f"invalid role {role!r}: expected one of {', '.join(ROLES)}")
    return role


def validate_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidArgument(
            f"invalid certificate name {name!r}: use 1-63 characters of a-z, 0-9, '.' and '-', "
            "starting with a letter or digit, without '..'"
        )
    if _reserved(name):
        raise InvalidArgument(f"invalid certificate name {name!r}: names under {SERVER_NAME_DOMAIN} are reserved")
    return name


def server_name(role: str, name: str) -> str:
    """The name a client verifies on a server's certificate: only a certificate issued for this
    role and this name carries it (so a user certificate named `controller` cannot serve)."""
    return f"{name}.{validate_role(role)}.{SERVER_NAME_DOMAIN}"


def _reserved(host: str) -> bool:
    host = host.lower().rstrip(".")
    return host == SERVER_NAME_DOMAIN or host.endswith("." + SERVER_NAME_DOMAIN)


def init_ca(pki_dir: Path, common_name: str = "Corral fleet CA") -> Path:
    """Create the fleet CA in `pki_dir`; returns the path of `ca.crt`."""
    pki_dir = Path(pki_dir)
    key_path, cert_path = pki_dir / CA_KEY, pki_dir / CA_CERT
    if key_path.exists():
        raise AlreadyExists(f"a CA already exists in {pki_dir} ({key_path}); refusing to replace it")
    pki_dir.mkdir(parents=True, exist_ok=True)

    key = ec.generate_private_key(ec.SECP256R1())
    cert = _build_ca(key, common_name, _CA_VALIDITY)
    # Key first: its existence is what marks the CA as present.
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def issue(pki_dir: Path, role: str, name: str, hosts: Sequence[str] = (),
          validity: datetime.timedelta = _LEAF_VALIDITY) -> CertPaths:  # fmt: skip
    """Issue (or re-issue) the leaf certificate `{role}-{name}` signed by the CA in `pki_dir`,
    valid for `validity` (never past the CA's end)."""
    pki_dir = Path(pki_dir)
    validate_role(role)
    validate_name(name)
    _check_name_free(pki_dir, role, name, hosts)
    ca_cert, ca_key = _load_ca(pki_dir)

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        ]
    )
    if role == "user":  # a client only: no name a server could be checked by, no serverAuth
        sans, usages = [], [ExtendedKeyUsageOID.CLIENT_AUTH]
    else:  # agents and the controller are both servers and clients of each other
        sans = [x509.DNSName(server_name(role, name)), *_sans(role, name, hosts)]
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = _build_leaf(ca_cert, ca_key, key, subject, sans, validity, usages)
    paths = CertPaths(
        cert=pki_dir / f"{role}-{name}.crt",
        key=pki_dir / f"{role}-{name}.key",
        ca=pki_dir / CA_CERT,
    )
    _write_private(paths.key, _key_pem(key))
    _write_public(paths.cert, cert.public_bytes(serialization.Encoding.PEM))
    return paths


# -- what a PKI directory holds, and renewal ------------------------------------------------------

CA_ROLE = "ca"  # the role `CertificateInfo` gives the CA's own certificate


@dataclass(frozen=True)
class CertificateInfo:
    """One certificate file: whom it names, for which hosts, until when."""

    path: Path
    role: str  # controller, agent, user; CA_ROLE for the CA
    name: str
    hosts: tuple[str, ...]  # its SANs, without the reserved role-qualified server name
    not_before: datetime.datetime
    not_after: datetime.datetime

    def days_left(self, now: datetime.datetime | None = None) -> float:
        """Days until it ends (negative once it has)."""
        now = now or datetime.datetime.now(datetime.timezone.utc)
        return (self.not_after - now).total_seconds() / 86400

    def state(self, warn_days: float, now: datetime.datetime | None = None) -> str:
        """ok, expiring (ends within `warn_days`) or expired."""
        left = self.days_left(now)
        return "expired" if left <= 0 else "expiring" if left <= warn_days else "ok"


def certificate_info(path: Path, pem: bytes | None = None) -> CertificateInfo:
    """Read one certificate file (or its `pem`); InvalidArgument if it is none."""
    try:
        cert = x509.load_pem_x509_certificate(pem if pem is not None else Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"{path}: not a readable PEM certificate ({exc})") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    try:
        sans = [str(g.value) for g in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value]
    except x509.ExtensionNotFound:
        sans = []
    return CertificateInfo(
        path=Path(path),
        role=CA_ROLE if is_ca else (str(units[0].value) if units else "?"),
        name=str(names[0].value) if names else "?",
        hosts=tuple(h for h in sans if not _reserved(h)),  # in the order issued
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )


def list_certificates(pki_dir: Path) -> list[CertificateInfo]:
    """Every certificate in `pki_dir` (`*.crt`): the CA first, then by file name."""
    pki_dir = Path(pki_dir)
    if not pki_dir.is_dir():
        raise NotFound(f"no PKI directory {pki_dir}")
    files = sorted(p for p in pki_dir.glob("*.crt") if not p.name.startswith("."))
    files.sort(key=lambda p: p.name != CA_CERT)
    return [certificate_info(p) for p in files]


def renew(pki_dir: Path, role: str, name: str, validity: datetime.timedelta = _LEAF_VALIDITY) -> CertPaths:
    """A new key and certificate for `{role}-{name}` with the hosts of the current one (its
    SANs), replacing both files; the old certificate stays valid until it ends."""
    pki_dir = Path(pki_dir)
    validate_role(role)
    validate_name(name)
    path = pki_dir / f"{role}-{name}.crt"
    if not path.exists():
        raise NotFound(f"no certificate {path} to renew (corral pki issue makes a first one)")
    current = certificate_info(path)
    if (current.role, current.name) != (role, name):
        raise FailedPrecondition(f"{path} is issued to {current.role} {current.name!r}, not to {role} {name!r}")
    return issue(pki_dir, role, name, current.hosts, validity)


def _check_name_free(pki_dir: Path, role: str, name: str, hosts: Sequence[str]) -> None:
    """One name, one role: a user named like a node or the controller could be mistaken for it
    (in logs, in `_require_self`, by a client that checked names only)."""
    if role == "user" and hosts:
        raise InvalidArgument("a user certificate names no hosts: users only call, they never serve")
    if name == CONTROLLER_NAME and role != "controller":
        raise InvalidArgument(f"the name {CONTROLLER_NAME!r} is the controller's; choose another {role} name")
    for other in ROLES:
        if other != role and (pki_dir / f"{other}-{name}.crt").exists():
            raise AlreadyExists(f"the name {name!r} is already a {other}'s in {pki_dir}; choose another {role} name")


@dataclass(frozen=True)
class OneTimeClient:
    """The client's side of a one-time TLS (PEM): what the server's peer is given, through the
    controller (a post-copy's page puller, a source sending its images)."""

    ca: bytes
    cert: bytes
    key: bytes

    def __repr__(self) -> str:  # never print the key
        return "OneTimeClient(...)"


@dataclass(frozen=True)
class OneTimeTls:
    """A throwaway CA and the two certificates it signed, for one connection's peers (PEM).
    The CA's key is never kept: nothing else can ever be signed by it."""

    ca_pem: bytes
    server_cert_pem: bytes
    server_key_pem: bytes
    client_cert_pem: bytes
    client_key_pem: bytes

    def __repr__(self) -> str:  # never print the keys
        return "OneTimeTls(...)"

    def client(self) -> OneTimeClient:
        return OneTimeClient(self.ca_pem, self.client_cert_pem, self.client_key_pem)


def one_time_tls(server_host: str, validity: datetime.timedelta, purpose: str) -> OneTimeTls:
    """Certificates for one connection: the server's names `server_host` (CN and SAN); the
    client is the only other holder of a certificate from this CA. Why: a fleet certificate
    proves membership of the fleet, not a part in this one transfer (CRIU's page server can
    check a peer's CA, not its role or name)."""
    try:
        ipaddress.ip_address(server_host)
    except ValueError:
        raise InvalidArgument(f"one-time TLS needs the server's IP address, not {server_host!r}") from None
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _build_ca(ca_key, f"Corral one-time CA: {purpose}"[:64], validity)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server = _build_leaf(ca, ca_key, server_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_host)]),
                         _sans("agent", server_host, ()), validity)  # fmt: skip
    client = _build_leaf(ca, ca_key, client_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client")]),
                         [x509.DNSName("client")], validity)  # fmt: skip
    pem = serialization.Encoding.PEM
    return OneTimeTls(ca.public_bytes(pem), server.public_bytes(pem), _key_pem(server_key),
                      client.public_bytes(pem), _key_pem(client_key))  # fmt: skip


def identity_from_pem(cert_pem: bytes) -> Identity:
    """Who a (chain-verified) peer certificate names: its OU (role) and CN (name)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise Unauthenticated(f"peer certificate is not valid PEM: {e}") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(names) != 1 or len(units) != 1:
        raise Unauthenticated("peer certificate must carry exactly one CN (name) and one OU (role)")
    name, role = str(names[0].value), str(units[0].value)
    if role not in ROLES:
        raise Unauthenticated(f"peer certificate has unknown role {role!r}")
    if not name:
        raise Unauthenticated("peer certificate has an empty CN")
    return Identity(role=role, name=name)


def _build_ca(key: ec.EllipticCurvePrivateKey, common_name: str, validity: datetime.timedelta) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


_BOTH_USAGES = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)


def _build_leaf(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, key: ec.EllipticCurvePrivateKey,
    subject: x509.Name, sans: list[x509.GeneralName], validity: datetime.timedelta,
    usages: Sequence[x509.ObjectIdentifier] = _BOTH_USAGES,
) -> x509.Certificate:  # fmt: skip
    now = datetime.datetime.now(datetime.timezone.utc)
    not_after = min(now + validity, ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _sans(role: str, name: str, hosts: Sequence[str]) -> list[x509.GeneralName]:
    wanted = [name, *hosts]
    if role == "controller":
        wanted += ["localhost", "127.0.0.1"]
    sans: list[x509.GeneralName] = []
    for host in dict.fromkeys(wanted):  # keep order, drop repeats
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or "/" in host or any(c.isspace() for c in host):
                raise InvalidArgument(f"invalid host name for a certificate: {host!r}") from None
            if _reserved(host):
                raise InvalidArgument(f"invalid host name {host!r}: names under {SERVER_NAME_DOMAIN} are reserved")
            sans.append(x509.DNSName(host))
    return sans


def _load_ca(pki_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = pki_dir / CA_CERT, pki_dir / CA_KEY
    if not cert_path.exists() or not key_path.exists():
        raise FailedPrecondition(f"no CA in {pki_dir}: create it first (init_ca)")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FailedPrecondition(f"CA key {key_path} is not an EC key")
    return cert, key


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    _write_atomic(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    _write_atomic(path, data, 0o644)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    # Created with its final mode (never briefly world-readable), then renamed
    # into place so a reader sees either the old file or the whole new one.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, mode)  # the umask must not change it
        f.write(data)
        f.flush()
        os.fsync(fd)
    os.replace(tmp, path)
