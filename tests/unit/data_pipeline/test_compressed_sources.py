"""Compressed sources (data_pipeline/sources.py): .jsonl, .txt and .md files compressed whole with gzip or
zstandard are read line by line as they decompress, give the records of the plain file (named by the
compressed file), prepare to the same rows, and a damaged stream stops naming the file and line."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import zstandard

from data_pipeline.prepare import PrepareOptions, prepare
from data_pipeline.sources import DataError, list_files, read_records
from trainer.config import bundled_path

QA = Path(bundled_path("medical_qa.jsonl"))
NOTES = Path(bundled_path("medical_notes.txt"))


def compress(src: Path, dst: Path) -> Path:
    raw = src.read_bytes()
    dst.write_bytes(gzip.compress(raw) if dst.suffix == ".gz" else zstandard.ZstdCompressor().compress(raw))
    return dst


@pytest.mark.parametrize(
    "src,name", [(QA, "qa.jsonl.gz"), (QA, "qa.jsonl.zst"), (NOTES, "n.txt.gz"), (NOTES, "n.txt.zst")]
)
def test_a_compressed_file_reads_as_the_plain_one(tmp_path, src, name):
    packed = compress(src, tmp_path / name)
    plain = list(read_records(str(src)))
    got = list(read_records(str(packed)))
    assert [r.data for r in got] == [r.data for r in plain] and len(got) > 20
    assert [r.where.replace(str(packed), "F") for r in got] == [r.where.replace(str(src), "F") for r in plain]


def test_compressed_sources_prepare_to_the_same_rows(tmp_path, tiny_tokenizer):
    opts = PrepareOptions(objective="sft", seq_len=256)
    plain = prepare(str(QA), tiny_tokenizer, opts, str(tmp_path / "a"))
    zst = prepare(str(compress(QA, tmp_path / "qa.jsonl.zst")), tiny_tokenizer, opts, str(tmp_path / "b"))
    for name in ("input_ids", "supervised", "position_ids", "filled"):
        assert np.array_equal(getattr(plain, name), getattr(zst, name)), name


def test_a_directory_mixes_plain_and_compressed_files_in_name_order(tmp_path):
    (tmp_path / "d").mkdir()
    compress(QA, tmp_path / "d" / "b.jsonl.gz")
    (tmp_path / "d" / "a.jsonl").write_bytes(QA.read_bytes())
    (tmp_path / "d" / "c.json.gz").write_bytes(b"")  # not offered: a .json file is read whole
    assert [f.name for f in list_files(str(tmp_path / "d"))] == ["a.jsonl", "b.jsonl.gz"]
    assert len(list(read_records(str(tmp_path / "d")))) == 2 * len(list(read_records(str(QA))))
    with pytest.raises(
        DataError, match=r"unsupported file type '.json.gz'.*\.jsonl, \.txt and \.md also as \.gz or \.zst"
    ):
        list_files(str(tmp_path / "d" / "c.json.gz"))


@pytest.mark.parametrize("damage", ["cut", "flipped"])
@pytest.mark.parametrize("name", ["qa.jsonl.gz", "qa.jsonl.zst"])
def test_a_stream_cut_short_stops_naming_the_file_and_line(tmp_path, name, damage):
    whole = bytearray(compress(QA, tmp_path / name).read_bytes())
    cut = tmp_path / f"cut-{name}"
    if damage == "cut":
        cut.write_bytes(whole[: len(whole) // 2])
    else:  # bytes in the middle of the compressed data changed (zlib.error / ZstdError, not OSError)
        for i in range(len(whole) // 2, len(whole) // 2 + 50):
            whole[i] ^= 0x5A
        cut.write_bytes(bytes(whole))
    with pytest.raises(
        DataError, match=rf"cut-{name}:\d+: the compressed stream is damaged or cut short after line \d+"
    ):
        list(read_records(str(cut)))
