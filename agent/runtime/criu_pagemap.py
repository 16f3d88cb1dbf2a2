"""How much memory a post-copy dump left behind: CRIU's `pagemap-PID.img` images, read without `crit`.

Format (CRIU 4.1 and 4.2: criu/image.c, criu/protobuf.c, images/pagemap.proto):

    u32 IMG_COMMON_MAGIC (0x54564319)  u32 PAGEMAP_MAGIC (0x56084025)
    then entries, each a u32 size and `size` bytes of protobuf:
    first a pagemap_head {1 pages_id}, then pagemap_entry {1 vaddr, 2 nr_pages, 3 in_parent, 4 flags,
    5 nr_pages (u64, CRIU >= 4.2; field 2 is then `compat_nr_pages`, read only when 5 is absent)}

with flags PE_PARENT 1, PE_LAZY 2, PE_PRESENT 4 (criu/include/pagemap.h). The lazy
entries are what the destination pulls from the source's page server: their sum is
the size of a post-copy's page transfer (for the progress shown to the user).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

from agent.runtime.criu_stats import StatsFormatError, parse_message

IMG_COMMON_MAGIC = 0x54564319
PAGEMAP_MAGIC = 0x56084025
PE_LAZY = 1 << 1
PAGE_SIZE = 4096
_PAGEMAP_FILE = re.compile(r"^pagemap-\d+\.img$")


def lazy_pages_of(data: bytes) -> int:
    """Pages marked lazy in one pagemap image."""
    if len(data) < 8:
        raise StatsFormatError(f"too short for a CRIU image ({len(data)} bytes)")
    head, magic = struct.unpack_from("<II", data)
    if head != IMG_COMMON_MAGIC or magic != PAGEMAP_MAGIC:
        raise StatsFormatError(f"not a CRIU pagemap image (magic {head:#010x} {magic:#010x})")
    pos, lazy, first = 8, 0, True
    while pos < len(data):
        if pos + 4 > len(data):
            raise StatsFormatError("truncated entry size")
        (size,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + size > len(data):
            raise StatsFormatError(f"entry of {size} bytes but only {len(data) - pos} left")
        entry = parse_message(data[pos : pos + size])
        pos += size
        if first:  # the pagemap_head
            first = False
            continue
        flags, pages = entry.get(4, 0), entry.get(5, entry.get(2, 0))
        if isinstance(flags, int) and isinstance(pages, int) and flags & PE_LAZY:
            lazy += pages
    return lazy


def lazy_bytes(images: Path) -> int:
    """Bytes of memory a post-copy dump in `images` left to be pulled (0 if unreadable)."""
    total = 0
    try:
        files = [p for p in images.iterdir() if _PAGEMAP_FILE.match(p.name)]
    except OSError:
        return 0
    for path in files:
        try:
            total += lazy_pages_of(path.read_bytes())
        except (OSError, StatsFormatError):
            continue  # a report, not the result
    return total * PAGE_SIZE
