"""A daemon's watch on the certificates it uses: at start and then daily, a warning in its log
when its own certificate or its CA ends within WARN_DAYS (an error once ended), and their ends
as the gauge `corral_certificate_expiry_timestamp_seconds` on its /metrics (corral.metrics).

A daemon reads its certificate at start only (corral.api.tls), so the ends reported are those
of the files as they were then; a renewed file found on disk later is logged as waiting for a
restart (deploy/GUIDE.md, Certificates and their renewal).
"""

from __future__ import annotations

import asyncio
import datetime
from dataclasses import dataclass
from typing import Callable

import structlog

from corral import pki
from corral.config import TlsFiles
from corral.errors import CorralError
from corral.metrics import CERTIFICATE_EXPIRY

log = structlog.get_logger("corral.certwatch")

WARN_DAYS = 30
CHECK_EVERY = 86400.0  # seconds: daily


@dataclass(frozen=True)
class InUse:
    """One certificate the daemon uses: its own ("own") or a trusted CA ("ca")."""

    kind: str
    info: pki.CertificateInfo


def read_in_use(tls: TlsFiles) -> list[InUse]:
    """The daemon's certificate and its CA's, from the files (blocking: call in a thread)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    found = [InUse("own", pki.certificate_info(tls.cert))]
    try:
        cas = x509.load_pem_x509_certificates(tls.ca.read_bytes())
    except (OSError, ValueError) as exc:
        raise CorralError(f"{tls.ca}: not a readable PEM certificate ({exc})") from None
    for ca in cas:  # a bundle may hold more than one
        found.append(InUse("ca", pki.certificate_info(tls.ca, ca.public_bytes(Encoding.PEM))))
    return found


def check(certs: list[InUse], warn_days: float = WARN_DAYS, now: datetime.datetime | None = None) -> list[str]:
    """Set the gauge for each certificate; log (and return) a warning for each that ends within
    `warn_days`, an error for each that has ended."""
    said = []
    for cert in certs:
        info = cert.info
        CERTIFICATE_EXPIRY.labels(cert.kind, info.role, info.name).set(info.not_after.timestamp())
        state = info.state(warn_days, now)
        if state == "ok":
            continue
        what = "certificate" if cert.kind == "own" else "CA certificate"
        left = info.days_left(now)
        message = (f"the {what} of {info.role} {info.name!r} ({info.path}) "
                   + (f"ended {info.not_after:%Y-%m-%d %H:%M} UTC" if state == "expired" else
                      f"ends {info.not_after:%Y-%m-%d %H:%M} UTC, in {left:.0f} days")
                   + ("" if cert.kind == "ca" else
                      f": renew it (corral pki renew --role {info.role} --name {info.name}) and restart"))  # fmt: skip
        (log.error if state == "expired" else log.warning)(message, certificate=cert.kind, role=info.role,
                                                            name=info.name, not_after=info.not_after.isoformat(),
                                                            days_left=round(left, 1))  # fmt: skip
        said.append(message)
    return said


class CertificateWatch:
    """Checks at start, then every `every` seconds, until cancelled."""

    def __init__(self, tls: TlsFiles, warn_days: float = WARN_DAYS, every: float = CHECK_EVERY,
                 now: Callable[[], datetime.datetime] | None = None) -> None:  # fmt: skip
        self.tls = tls
        self.warn_days = warn_days
        self.every = every
        self.now = now or (lambda: datetime.datetime.now(datetime.timezone.utc))
        self.in_use: list[InUse] = []

    async def run(self) -> None:
        try:
            self.in_use = await asyncio.to_thread(read_in_use, self.tls)
        except CorralError as exc:  # the daemon loaded these files: this is no reason to stop it
            log.warning("cannot read the certificates in use", error=exc.message)
            return
        while True:
            check(self.in_use, self.warn_days, self.now())
            await asyncio.sleep(self.every)
            await self._renewed_on_disk()

    async def _renewed_on_disk(self) -> None:
        try:
            on_disk = await asyncio.to_thread(read_in_use, self.tls)
        except CorralError:
            return  # being replaced right now, say; the next look will tell
        ends = {(c.kind, c.info.not_after) for c in self.in_use}
        for cert in on_disk:
            if (cert.kind, cert.info.not_after) not in ends:
                log.info("a new certificate is on disk: restart the daemon to use it", file=str(cert.info.path),
                         not_after=cert.info.not_after.isoformat())  # fmt: skip
