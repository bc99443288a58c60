"""Data preparation on several worker processes (data.prepare_workers, data_pipeline/prepare.py): the
prepared arrays and manifest stats are byte-identical for 1, 2 and 3 workers, malformed records are
skipped and counted the same way or stop the run naming file:line, and small sources skip the pool.
The workers are real spawned processes (the pool is forced on for these small files)."""

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
    with pytest.raises(DataError, match=r"(?s)mixed.jsonl:101: .*set data.on_error=skip"):
        prepare(str(mixed), tiny_tokenizer, PrepareOptions(objective="sft", seq_len=128), str(tmp_path), workers=2)
    assert not list(tmp_path.glob("*/manifest.json"))  # nothing half-written is left to be mistaken for done


def test_a_small_source_is_tokenized_in_process(tmp_path, tiny_tokenizer, monkeypatch):
    def no_pool(*a, **k):
        raise AssertionError("a pool was started for a small source")

    monkeypatch.setattr("multiprocessing.context.SpawnContext.Pool", no_pool)
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
