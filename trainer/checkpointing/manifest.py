"""The COMPLETE manifest's unit: a file's size and CRC-32. A checkpoint (checkpoint.py) and a
universal conversion (reshard.py) are intact when every file they list still has its digest."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import List


def digest(path: Path) -> List[int]:
    """[size in bytes, CRC-32] of `path`, read 16 MiB at a time."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return [path.stat().st_size, crc]
