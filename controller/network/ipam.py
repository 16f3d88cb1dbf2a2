"""IPv4 address assignment from the fleet's container range.

An address belongs to the container for its whole life, wherever it runs, so a
migrated container answers on the same address.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable

from corral.errors import ConfigError, NoCapacity
from corral.model import NetworkAttachment


@dataclass(frozen=True)
class AddressPool:
    subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address | None
    first: ipaddress.IPv4Address
    last: ipaddress.IPv4Address

    @classmethod
    def parse(cls, subnet: str, gateway: str, first: str, last: str) -> "AddressPool":
        try:
            net = ipaddress.IPv4Network(subnet, strict=True)
            gw = ipaddress.IPv4Address(gateway) if gateway else None
            lo, hi = ipaddress.IPv4Address(first), ipaddress.IPv4Address(last)
        except ValueError as exc:
            raise ConfigError(f"invalid network settings: {exc}") from None
        if lo not in net or hi not in net or lo > hi:
            raise ConfigError(f"address range {lo}-{hi} is not inside {net}")
        return cls(net, gw, lo, hi)

    def allocate(self, used: Iterable[str]) -> NetworkAttachment:
        taken = {ipaddress.IPv4Address(u) for u in used if u}
        if self.gateway:
            taken.add(self.gateway)
        address = self.first
        while address <= self.last:
            if address not in taken:
                return attachment(address, self.subnet.prefixlen, self.gateway)
            address += 1
        raise NoCapacity(f"no free container address left in {self.first}-{self.last}")


def attachment(address: ipaddress.IPv4Address, prefix: int, gateway) -> NetworkAttachment:
    # A locally administered MAC derived from the address: stable across moves.
    octets = address.packed
    mac = "02:cc:" + ":".join(f"{b:02x}" for b in octets)
    return NetworkAttachment(ipv4_cidr=f"{address}/{prefix}", gateway=str(gateway or ""), mac=mac)
