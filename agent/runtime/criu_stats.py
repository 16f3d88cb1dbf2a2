"""CRIU's own timings: the `stats-dump` and `stats-restore` images, read without `crit`.

CRIU (4.1.1, criu/stats.c) writes them into its work directory (with
lxc-checkpoint, the checkpoint directory) after each dump and restore. The
format (criu/image.c, criu/protobuf.c, criu/include/magic.h):

    u32 IMG_SERVICE_MAGIC (0x55105940)  u32 STATS_MAGIC (0x57093306)
    u32 size                            `size` bytes of a protobuf StatsEntry

all little-endian, with StatsEntry from images/stats.proto:

    message stats_entry { optional dump_stats_entry dump = 1; optional restore_stats_entry restore = 2; }
    dump_stats_entry:    1 freezing_time, 2 frozen_time, 3 memdump_time, 4 memwrite_time (uint32, us),
                         5 pages_scanned, 6 pages_skipped_parent, 7 pages_written, 9 pages_lazy (uint64),
                         8 irmap_resolve (uint32, us) ...
    restore_stats_entry: 1 pages_compared, 2 pages_skipped_cow (uint64), 3 forking_time,
                         4 restore_time (uint32, us), 5 pages_restored (uint64)

Every field we read is a varint, so a small protobuf reader is all we need
(no generated code, no dependency on CRIU's Python bindings).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

IMG_SERVICE_MAGIC = 0x55105940
STATS_MAGIC = 0x57093306
DUMP_STATS_FILE = "stats-dump"
RESTORE_STATS_FILE = "stats-restore"

_WIRE_VARINT, _WIRE_FIXED64, _WIRE_LEN, _WIRE_FIXED32 = 0, 1, 2, 5


class StatsFormatError(ValueError):
    """The file is not a CRIU stats image we can read."""


@dataclass(frozen=True)
class DumpStats:
    freezing_us: int
    frozen_us: int
    memdump_us: int
    memwrite_us: int
    pages_scanned: int
    pages_skipped_parent: int
    pages_written: int
    pages_lazy: int
    irmap_resolve_us: int | None = None


@dataclass(frozen=True)
class RestoreStats:
    forking_us: int
    restore_us: int
    pages_compared: int
    pages_skipped_cow: int
    pages_restored: int | None = None


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise StatsFormatError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise StatsFormatError("varint longer than 64 bits")


def parse_message(buf: bytes) -> dict[int, int | bytes]:
    """Field number -> value (varints as int, length-delimited as bytes); the last one wins,
    as in protobuf. Fixed-width fields are skipped (stats.proto has none)."""
    fields: dict[int, int | bytes] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise StatsFormatError("field number 0")
        if wire == _WIRE_VARINT:
            fields[number], pos = _varint(buf, pos)
        elif wire == _WIRE_LEN:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise StatsFormatError("truncated length-delimited field")
            fields[number] = buf[pos : pos + length]
            pos += length
        elif wire == _WIRE_FIXED64:
            pos += 8
        elif wire == _WIRE_FIXED32:
            pos += 4
        else:
            raise StatsFormatError(f"unsupported wire type {wire}")
    if pos != len(buf):
        raise StatsFormatError("truncated fixed-width field")
    return fields


def parse_stats_image(data: bytes) -> dict[int, int | bytes]:
    """The StatsEntry fields of a whole stats image file."""
    if len(data) < 12:
        raise StatsFormatError(f"too short for a CRIU image ({len(data)} bytes)")
    head, magic, size = struct.unpack_from("<III", data)
    if head != IMG_SERVICE_MAGIC or magic != STATS_MAGIC:
        raise StatsFormatError(f"not a CRIU stats image (magic {head:#010x} {magic:#010x})")
    if 12 + size > len(data):
        raise StatsFormatError(f"entry of {size} bytes but only {len(data) - 12} in the file")
    return parse_message(data[12 : 12 + size])


def _int(fields: dict[int, int | bytes], number: int, default: int | None = 0) -> int | None:
    value = fields.get(number, default)
    if isinstance(value, bytes):
        raise StatsFormatError(f"field {number} is not a number")
    return value


def _sub(entry: dict[int, int | bytes], number: int) -> dict[int, int | bytes] | None:
    raw = entry.get(number)
    if raw is None:
        return None
    if not isinstance(raw, bytes):
        raise StatsFormatError(f"field {number} is not a message")
    return parse_message(raw)


def dump_stats_from_bytes(data: bytes) -> DumpStats | None:
    d = _sub(parse_stats_image(data), 1)
    if d is None:
        return None
    return DumpStats(
        freezing_us=_int(d, 1), frozen_us=_int(d, 2), memdump_us=_int(d, 3), memwrite_us=_int(d, 4),
        pages_scanned=_int(d, 5), pages_skipped_parent=_int(d, 6), pages_written=_int(d, 7),
        pages_lazy=_int(d, 9), irmap_resolve_us=_int(d, 8, None),
    )  # fmt: skip


def restore_stats_from_bytes(data: bytes) -> RestoreStats | None:
    r = _sub(parse_stats_image(data), 2)
    if r is None:
        return None
    return RestoreStats(
        pages_compared=_int(r, 1), pages_skipped_cow=_int(r, 2), forking_us=_int(r, 3),
        restore_us=_int(r, 4), pages_restored=_int(r, 5, None),
    )  # fmt: skip


def read_dump_stats(images: Path) -> DumpStats | None:
    """CRIU's dump stats in `images`, None if it wrote none (it does not after a failed dump)."""
    try:
        return dump_stats_from_bytes((images / DUMP_STATS_FILE).read_bytes())
    except FileNotFoundError:
        return None


def read_restore_stats(images: Path) -> RestoreStats | None:
    try:
        return restore_stats_from_bytes((images / RESTORE_STATS_FILE).read_bytes())
    except FileNotFoundError:
        return None
