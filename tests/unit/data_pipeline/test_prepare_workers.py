"""Data preparation in units on several worker processes (data.prepare_workers, data_pipeline/prepare.py):
the prepared arrays and manifest stats are byte-identical for 1, 2 and 3 workers and any cut into
units, malformed records are skipped and counted the same way or stop the run naming file:line, a
killed preparation resumes from its finished units, and small sources skip the pool. The workers are
real spawned processes (the pool and small units are forced on for these small files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import prepare as prep
from data_pipeline.prepare import PrepareOptions, prepare
from data_pipeline.sources import DataError
from trainer.config import bundled_path

ARRAYS = ("input_ids.npy", "supervised.npy", "position_ids.npy", "filled.npy")


@pytest.fixture
def mixed(tmp_path):
    """Chat and prompt/completion records with two malformed lines among them (records 101 and 202)."""
    lines = Path(bundled_path("medical_qa.jsonl")).read_text(encoding="utf-8").splitlines()
    chat = [
        json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a {i}"}]})
        for i in range(60)
    ]
    rows = lines + chat
    rows.insert(100, "{not json")
    rows.insert(201, json.dumps({"neither": "format"}))
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("stage", ["instruct", "pretrain"])
def test_any_worker_count_prepares_the_same_bytes(tmp_path, tiny_tokenizer, mixed, monkeypatch, stage):
    monkeypatch.setattr(prep, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(prep, "unit_bytes_for", lambda total: 4096)  # ~30 units of these small files
    opts = PrepareOptions(objective=stage, seq_len=128, on_error="skip")
    made = {w: prepare(str(mixed), tiny_tokenizer, opts, str(tmp_path / f"w{w}"), workers=w) for w in (1, 2, 3)}
    one = made[1]
    assert one.stats["skipped_malformed"] == 2 and one.stats["records"] == 252 + 60
    for w in (2, 3):
        assert made[w].directory.name == one.directory.name  # the same cache key: workers are not in it
        for name in ARRAYS:
            assert (made[w].directory / name).read_bytes() == (one.directory / name).read_bytes(), (w, name)
        assert made[w].stats == one.stats


def test_a_malformed_record_on_a_worker_stops_the_run_naming_its_line(tmp_path, tiny_tokenizer, mixed, monkeypatch):
    monkeypatch.setattr(prep, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(prep, "unit_bytes_for", lambda total: 4096)
    with pytest.raises(DataError, match=r"(?s)mixed.jsonl:101: .*set data.on_error=skip"):
        prepare(str(mixed), tiny_tokenizer, PrepareOptions(objective="sft", seq_len=128), str(tmp_path), workers=2)
    assert not list(tmp_path.glob("*/manifest.json"))  # nothing half-written is left to be mistaken for done


def test_a_small_source_is_tokenized_in_process(tmp_path, tiny_tokenizer, monkeypatch):
    def no_pool(*a, **k):
        raise AssertionError("a pool was started for a small source")

    monkeypatch.setattr("multiprocessing.context.SpawnContext.Pool", no_pool)
    monkeypatch.setattr(prep, "unit_bytes_for", lambda total: 4096)  # several units, yet under POOL_MIN_BYTES
    p = prepare(
        str(bundled_path("medical_qa.jsonl")), tiny_tokenizer, PrepareOptions("sft", 128), str(tmp_path), workers=4
    )
    assert len(p) > 0 and np.asarray(p.filled).sum() == p.stats["real_tokens"]


def test_workers_default_to_the_usable_cores_and_negative_is_refused():
    from trainer.cli import load_config

    assert prep.usable_cores() >= 1
    assert load_config(["output_dir=/tmp/x"]).data.prepare_workers == 0
    with pytest.raises(SystemExit, match=r"data.prepare_workers=-1: must be >= 0"):
        load_config(["output_dir=/tmp/x", "data.prepare_workers=-1"])


def test_a_killed_preparation_resumes_from_its_finished_units(tmp_path, tiny_tokenizer, mixed, monkeypatch):
    monkeypatch.setattr(prep, "unit_bytes_for", lambda total: 4096)
    opts = PrepareOptions(objective="instruct", seq_len=128, on_error="skip")
    whole = prepare(str(mixed), tiny_tokenizer, opts, str(tmp_path / "whole"), workers=1)
    # A first run dies in unit 5: units 0-4 are kept, the half-written one is not.
    real = prep._tokenize_unit

    def dies_at_5(job, *a):
        if job[0] == 5:
            raise KeyboardInterrupt
        return real(job, *a)

    monkeypatch.setattr(prep, "_tokenize_unit", dies_at_5)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(mixed), tiny_tokenizer, opts, str(tmp_path / "c"), workers=1)
    units = next((tmp_path / "c").glob("*.units"))
    assert sorted(p.name for p in units.iterdir() if p.is_dir()) == [f"{i:06d}" for i in range(5)]
    # The rerun tokenizes the rest only, and ends where one straight run does.
    seen = []
    monkeypatch.setattr(prep, "_tokenize_unit", lambda job, *a: seen.append(job[0]) or real(job, *a))
    again = prepare(str(mixed), tiny_tokenizer, opts, str(tmp_path / "c"), workers=1)
    assert seen[0] == 5 and 4 not in seen and not units.exists()
    for name in ARRAYS:
        assert (again.directory / name).read_bytes() == (whole.directory / name).read_bytes(), name
    assert again.stats == whole.stats


def test_array_tasks_tokenize_their_units_and_the_merge_packs_the_same_bytes(
    tmp_path, tiny_tokenizer, mixed, monkeypatch
):
    monkeypatch.setattr(prep, "unit_bytes_for", lambda total: 4096)
    opts = PrepareOptions(objective="sft", seq_len=128, on_error="skip")
    whole = prepare(str(mixed), tiny_tokenizer, opts, str(tmp_path / "whole"), workers=1)
    cache = str(tmp_path / "shared")
    tokenized = []
    real = prep._tokenize_unit
    monkeypatch.setattr(prep, "_tokenize_unit", lambda job, *a: tokenized.append(job[0]) or real(job, *a))
    said = [prep.prepare_shard(str(mixed), tiny_tokenizer, opts, cache, i, 3, workers=1) for i in (2, 0)]
    n = len(prep.plan(str(mixed), next(Path(cache).glob("*.units"))))
    assert n > 10 and sorted(tokenized) == [i for i in range(n) if i % 3 != 1]
    assert f"units 2::3 of {n} tokenized" in said[0] and "left for other tasks" in said[1]
    # A task rerun (requeued) keeps what it finished; task 1 does its own share only.
    tokenized.clear()
    prep.prepare_shard(str(mixed), tiny_tokenizer, opts, cache, 0, 3, workers=1)
    prep.prepare_shard(str(mixed), tiny_tokenizer, opts, cache, 1, 3, workers=1)
    assert tokenized == [i for i in range(n) if i % 3 == 1]
    # A damaged unit (a flipped byte: its recorded sha256 no longer matches) is tokenized again by the
    # merge, which tokenizes nothing else and packs the rows one process packs.
    shard = next(Path(cache).glob("*.units")) / "000004" / "tokens.u32"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    tokenized.clear()
    merged = prepare(str(mixed), tiny_tokenizer, opts, cache, workers=1)
    assert tokenized == [4] and merged.directory.name == whole.directory.name
    for name in ARRAYS:
        assert (merged.directory / name).read_bytes() == (whole.directory / name).read_bytes(), name
    assert merged.stats == whole.stats
    assert "already prepared" in prep.prepare_shard(str(mixed), tiny_tokenizer, opts, cache, 0, 3)


@pytest.mark.parametrize("unit_bytes", [300, 5000, 1 << 30])
def test_units_read_one_after_another_are_the_source(tmp_path, unit_bytes):
    """Plain .jsonl cut at line starts, .txt at blank lines, parquet at row groups, a compressed file
    whole: every record once, in order, with its file:line (or file:[row])."""
    import gzip
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_pipeline.sources import plan_units, read_records, read_unit

    rng = random.Random(0)
    d = tmp_path / "src"
    d.mkdir()
    (d / "a.jsonl").write_text("".join(json.dumps({"text": "x" * rng.randint(0, 200)}) + "\n" for _ in range(300)))
    docs = ["\n".join("y" * rng.randint(1, 60) for _ in range(rng.randint(1, 4))) for _ in range(200)]
    (d / "b.txt").write_text("\n\n".join(docs) + "\n")
    (d / "c.jsonl.gz").write_bytes(gzip.compress((d / "a.jsonl").read_bytes()))
    pq.write_table(
        pa.table({"text": [f"row {i} " + "z" * (i % 90) for i in range(3000)]}), d / "d.parquet", row_group_size=200
    )
    units = plan_units(str(d), unit_bytes)
    got = [(r.data, r.where) for u in units for r in read_unit(u)]
    assert got == [(r.data, r.where) for r in read_records(str(d))] and len(got) == 300 + 200 + 300 + 3000
    per_file = {f: sum(u.file.endswith(f) for u in units) for f in ("a.jsonl", "b.txt", "c.jsonl.gz", "d.parquet")}
    assert per_file["c.jsonl.gz"] == 1  # a compressed file is read whole
    if unit_bytes == 300:
        assert min(per_file["a.jsonl"], per_file["b.txt"], per_file["d.parquet"]) > 5


def test_a_plan_stored_with_one_working_directory_serves_another(tmp_path, tiny_tokenizer, mixed, monkeypatch):
    """The plan names files by absolute path: a process started elsewhere (another array task, a resume
    with data.path given relative to another directory) reads the same files."""
    monkeypatch.setattr(prep, "unit_bytes_for", lambda total: 4096)
    opts = PrepareOptions(objective="sft", seq_len=128, on_error="skip")
    monkeypatch.chdir(mixed.parent)
    prep.prepare_shard("mixed.jsonl", tiny_tokenizer, opts, str(tmp_path / "c"), 0, 2, workers=1)
    monkeypatch.chdir(tmp_path.parent)
    relative = str(mixed.relative_to(tmp_path.parent))
    merged = prepare(relative, tiny_tokenizer, opts, str(tmp_path / "c"), workers=1)
    whole = prepare(str(mixed), tiny_tokenizer, opts, str(tmp_path / "w"), workers=1)
    assert (merged.directory / "input_ids.npy").read_bytes() == (whole.directory / "input_ids.npy").read_bytes()
