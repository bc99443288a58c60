"""Read a W&B offline run file (`wandb/offline-run-*/run-<id>.wandb`) back into protobuf records.

W&B >= 0.20 ships no Python reader for its transaction log. The file is a LevelDB-style log:
a 7-byte file header (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of records, each with
a 7-byte header (crc32 4 bytes, payload length 2 bytes, type 1 byte). A payload too long for the
rest of a block is split FIRST / MIDDLE... / LAST across blocks; a block tail shorter than a record
header is zero padding. Each reassembled payload is a `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List

BLOCK = 32 * 1024
FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version
RECORD_HEADER = struct.Struct("<IHB")  # crc32, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def payloads(data: bytes) -> Iterator[bytes]:
    """The reassembled record payloads of a LevelDB-style log (file header included in `data`)."""
    ident, magic, version = FILE_HEADER.unpack_from(data, 0)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, hex(magic), version)
    pos, pending = FILE_HEADER.size, None
    while pos + RECORD_HEADER.size <= len(data):
        room = BLOCK - pos % BLOCK
        if room < RECORD_HEADER.size:  # zero padding at the end of a block
            pos += room
            continue
        crc, length, kind = RECORD_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:  # preallocated, never written: the end of the log
            return
        body = data[pos + RECORD_HEADER.size : pos + RECORD_HEADER.size + length]
        assert len(body) == length, f"truncated record at byte {pos}"
        # The checksum covers the type byte and the payload (LevelDB's convention, unmasked here).
        assert zlib.crc32(body, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"bad crc at byte {pos}"
        pos += RECORD_HEADER.size + length
        if kind == FULL:
            assert pending is None, "FULL record inside a fragmented one"
            yield body
        elif kind == FIRST:
            pending = bytearray(body)
        elif kind == MIDDLE:
            pending += body
        elif kind == LAST:
            pending += body
            yield bytes(pending)
            pending = None
        else:
            raise AssertionError(f"unknown record type {kind} at byte {pos}")


def write_log(blobs: List[bytes]) -> bytes:
    """The inverse of `payloads` (for testing the reader on fragmented records)."""
    out = bytearray(FILE_HEADER.pack(b":W&B", 0xBEE1, 0))
    for blob in blobs:
        first = True
        while True:
            room = BLOCK - len(out) % BLOCK
            if room < RECORD_HEADER.size:
                out += bytes(room)
                continue
            chunk, blob = blob[: room - RECORD_HEADER.size], blob[room - RECORD_HEADER.size :]
            kind = (FULL if first else LAST) if not blob else (FIRST if first else MIDDLE)
            out += RECORD_HEADER.pack(zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF, len(chunk), kind)
            out += chunk
            first = False
            if not blob:
                break
    return bytes(out)


@dataclass
class OfflineRun:
    """What one offline run file says: its run record(s), config, and history rows."""

    path: Path
    runs: List[Any] = field(default_factory=list)
    config: Dict[str, Any] = field(default_factory=dict)
    history: List[Dict[str, Any]] = field(default_factory=list)
    raw: bytes = b""

    @property
    def run_id(self) -> str:
        ids = {r.run_id for r in self.runs}
        assert len(ids) == 1, ids
        return ids.pop()


def read_run(path: Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    run = OfflineRun(path=Path(path), raw=data)
    for blob in payloads(data):
        record = pb.Record()
        record.ParseFromString(blob)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.runs.append(record.run)
            _apply_config(run.config, record.run.config.update)
        elif kind == "config":
            _apply_config(run.config, record.config.update)
        elif kind == "history":
            run.history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
    return run


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _apply_config(config: Dict[str, Any], items) -> None:
    for item in items:
        config[_key(item)] = json.loads(item.value_json)


def offline_runs(output_dir: Path) -> List[OfflineRun]:
    """Every offline run under output_dir/wandb, oldest first."""
    return [read_run(p) for p in sorted(Path(output_dir).glob("wandb/offline-run-*/run-*.wandb"))]
