"""Is something listening on a TCP port of this network namespace? Asked of the kernel by
sock_diag netlink, for listening sockets only.

Why not /proc/net/tcp: reading it walks every TCP socket of the machine, all network
namespaces, and took 7-8 ms here a read; polled every few ms while a post-copy source
dumps, that was most of a core taken from CRIU on a 2-core host. A sock_diag dump of the
listening sockets costs tens of microseconds. (Connecting to find out is not an option:
CRIU's page server serves the first connection it gets.)
"""

from __future__ import annotations

import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_LISTEN = 10
_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_REQ = struct.Struct("=BBBBI")  # inet_diag_req_v2: family, protocol, ext, pad, states
_SOCKID_LEN = 2 + 2 + 16 + 16 + 4 + 8  # inet_diag_sockid: sport, dport, src, dst, if, cookie


def listening(port: int) -> bool:
    """True if a TCP socket (IPv4 or IPv6) listens on `port` in this network namespace."""
    return any(_listening(family, port) for family in (socket.AF_INET, socket.AF_INET6))


def _listening(family: int, port: int) -> bool:
    request = _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_LISTEN) + bytes(_SOCKID_LEN)
    header = _NLMSG.pack(_NLMSG.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as sock:
        sock.sendto(header + request, (0, 0))
        found = False
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + _NLMSG.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, offset)
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    (error,) = struct.unpack_from("=i", data, offset + _NLMSG.size)
                    raise OSError(-error, f"sock_diag: {error}")
                # inet_diag_msg: family, state, timer, retrans (u8 each), then the sockid (sport first, big-endian)
                (sport,) = struct.unpack_from("!H", data, offset + _NLMSG.size + 4)
                found = found or sport == port
                offset += (length + 3) & ~3 if length else len(data)
