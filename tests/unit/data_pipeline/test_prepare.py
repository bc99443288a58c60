"""Unit: prepare-once (rows on disk, manifest, cache reuse, one preparer), packed-row invariants, and
that packing changes nothing a document sees: its logits and its loss equal those of the document
alone."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
import torch

from data_pipeline.loader import trim_to_longest
from data_pipeline.packing import IGNORE
from data_pipeline.prepare import PrepareOptions, _write_chunked, prepare
from data_pipeline.sources import DataError
from helpers import tiny_llama
from trainer.config import bundled_path
from trainer.objectives.token import token_loss_sum

QA = bundled_path("medical_qa.jsonl")
NOTES = bundled_path("medical_notes.txt")


def test_chunked_rows_by_hand(tmp_path):
    """The worked example of _write_chunked: documents [a a a a a][b b][c c c], seq_len 4."""
    tokens = np.array([1, 1, 1, 1, 1, 2, 2, 3, 3, 3], dtype=np.uint32)
    mask = np.ones(10, dtype=np.uint8)
    rows = _write_chunked(tmp_path, tokens, mask, np.array([5, 2, 3]), seq_len=4, pad_id=0)
    assert rows == 3
    ids = np.load(tmp_path / "input_ids.npy")
    pos = np.load(tmp_path / "position_ids.npy")
    sup = np.load(tmp_path / "supervised.npy")
    assert ids.tolist() == [[1, 1, 1, 1], [1, 2, 2, 3], [3, 3, 0, 0]]
    assert pos.tolist() == [[0, 1, 2, 3], [0, 0, 1, 0], [0, 1, 0, 1]]
    assert sup.astype(int).tolist() == [[0, 1, 1, 1], [0, 0, 1, 0], [0, 1, 0, 0]]
    assert np.load(tmp_path / "filled.npy").tolist() == [4, 4, 2]


@pytest.mark.parametrize("stage,path", [("instruct", QA), ("sft", QA), ("pretrain", NOTES)])
def test_packed_rows_hold_every_sample_once_with_restarting_positions(tmp_path, tiny_tokenizer, stage, path):
    p = prepare(path, tiny_tokenizer, PrepareOptions(objective=stage, seq_len=256), str(tmp_path))
    rows = p.rows(np.arange(len(p)))
    ids, labels, pos = rows["input_ids"], rows["labels"], rows["position_ids"]
    assert ids.shape == (len(p), 256) and (p.filled <= 256).all()
    starts = pos == 0
    # A document's first label is never learned (no prediction across a boundary).
    assert (labels[starts] == IGNORE).all()
    # Positions count up by one inside a document.
    inside = ~starts[:, 1:]
    assert (pos[:, 1:][inside] == pos[:, :-1][inside] + 1).all()
    # Padding is never learned and is exactly the tail beyond `filled`.
    tail = np.arange(256)[None, :] >= p.filled[:, None]
    assert (ids[tail] == tiny_tokenizer.pad_token_id).all() and (labels[tail] == IGNORE).all()
    assert p.stats["real_tokens"] == int(p.filled.sum())
    if stage != "pretrain":  # whole samples, each placed exactly once
        n_docs = sum(int(starts[r, : p.filled[r]].sum()) for r in range(len(p)))
        assert n_docs == p.stats["samples"] == p.stats["records"]
        # every (single-turn) sample ends in exactly one learned EOS
        assert int((labels == tiny_tokenizer.eos_token_id).sum()) == p.stats["samples"]
    assert p.stats["packing_efficiency"] > 0.95


def test_cache_is_reused_and_any_change_prepares_afresh(tmp_path, tiny_tokenizer):
    opts = PrepareOptions(objective="sft", seq_len=256)
    first = prepare(QA, tiny_tokenizer, opts, str(tmp_path))
    made = (first.directory / "manifest.json").stat().st_mtime_ns
    again = prepare(QA, tiny_tokenizer, opts, str(tmp_path))
    assert again.directory == first.directory and (again.directory / "manifest.json").stat().st_mtime_ns == made
    other = prepare(QA, tiny_tokenizer, PrepareOptions(objective="sft", seq_len=128), str(tmp_path))
    assert other.directory != first.directory
    copy = tmp_path / "qa.jsonl"
    copy.write_text(open(QA).read())
    before = prepare(str(copy), tiny_tokenizer, opts, str(tmp_path)).directory
    with open(copy, "a") as f:
        f.write(json.dumps({"instruction": "What is a pulse?", "output": "The heartbeat felt at an artery."}) + "\n")
    assert prepare(str(copy), tiny_tokenizer, opts, str(tmp_path)).directory != before
    manifest = json.loads((first.directory / "manifest.json").read_text())
    assert {"sources", "tokenizer", "options", "stats", "seconds"} <= set(manifest)
    assert not list(tmp_path.glob(".*"))  # no temporary directories left behind


def test_only_one_process_prepares_and_the_others_wait_on_the_filesystem(tmp_path, tiny_tokenizer):
    opts = PrepareOptions(objective="sft", seq_len=256)
    from data_pipeline.prepare import cache_key

    key, _ = cache_key(QA, tiny_tokenizer, opts)
    lock = tmp_path / f"{key}.lock"
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid(), "since": time.time()}))
    got = {}
    waiter = threading.Thread(target=lambda: got.update(p=prepare(QA, tiny_tokenizer, opts, str(tmp_path))))
    waiter.start()  # a preparer that finds a live lock waits instead of preparing twice
    time.sleep(1.5)
    assert waiter.is_alive() and not (tmp_path / key).exists()
    lock.unlink()
    real = prepare(QA, tiny_tokenizer, opts, str(tmp_path), preparer=True)  # the "other process" finishes
    waiter.join(timeout=30)
    assert got["p"].directory == real.directory


def test_a_stale_lock_from_a_dead_process_is_taken_over(tmp_path, tiny_tokenizer):
    opts = PrepareOptions(objective="sft", seq_len=256)
    from data_pipeline.prepare import cache_key

    key, _ = cache_key(QA, tiny_tokenizer, opts)
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    (tmp_path / f"{key}.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead, "since": 0}))
    assert len(prepare(QA, tiny_tokenizer, opts, str(tmp_path))) > 0


def test_a_waiter_gives_up_with_a_message_when_no_one_prepares(tmp_path, tiny_tokenizer):
    opts = PrepareOptions(objective="sft", seq_len=256)
    with pytest.raises(DataError, match="still being prepared after 2 s .*launch/prepare_data.py"):
        from data_pipeline.prepare import cache_key

        key, _ = cache_key(QA, tiny_tokenizer, opts)
        (tmp_path / f"{key}.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": 0}))
        prepare(QA, tiny_tokenizer, opts, str(tmp_path), preparer=False, timeout_s=2)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_every_packed_document_has_its_standalone_logits(tmp_path, tiny_tokenizer, attn):
    model = tiny_llama(len(tiny_tokenizer), attn)
    p = prepare(QA, tiny_tokenizer, PrepareOptions(objective="instruct", seq_len=256), str(tmp_path))
    rows = p.rows(np.arange(3))
    with torch.no_grad():
        packed = model(
            input_ids=torch.from_numpy(rows["input_ids"]),
            position_ids=torch.from_numpy(rows["position_ids"]),
            use_cache=False,
        ).logits
        checked = 0
        for r in range(3):
            pos = rows["position_ids"][r][: p.filled[r]]
            starts = list(np.flatnonzero(pos == 0)) + [int(p.filled[r])]
            for a, b in zip(starts, starts[1:]):
                alone = model(input_ids=torch.from_numpy(rows["input_ids"][r, a:b])[None], use_cache=False).logits[0]
                assert torch.allclose(packed[r, a:b], alone, atol=1e-5), (r, a, b)
                checked += 1
    assert checked >= 9  # several documents per row, the later ones included


def test_packed_and_unpacked_training_see_the_same_loss_and_gradients(tmp_path, tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer), "sdpa").train()
    opts = dict(objective="instruct", seq_len=256)
    packed = prepare(QA, tiny_tokenizer, PrepareOptions(**opts), str(tmp_path))
    unpacked = prepare(QA, tiny_tokenizer, PrepareOptions(**opts, packing=False), str(tmp_path))
    assert len(unpacked) == unpacked.stats["samples"] > 3 * len(packed)  # what padding would cost

    widths = []

    def loss_and_grads(prep, trim=None):
        model.zero_grad()
        total, tokens = 0.0, 0
        for chunk in np.array_split(np.arange(len(prep)), 4):
            rows = prep.rows(chunk)
            if trim:  # what the loader does without packing: cut to the longest sample of the batch
                rows = trim_to_longest(rows, prep.filled[chunk], trim)
                widths.append(rows["input_ids"].shape[1])
            labels = torch.from_numpy(rows["labels"])
            out = model(
                input_ids=torch.from_numpy(rows["input_ids"]),
                position_ids=torch.from_numpy(rows["position_ids"]),
                use_cache=False,
            )
            loss = token_loss_sum(out.logits, labels)
            loss.backward()
            total += loss.item()
            tokens += int((labels[:, 1:] != IGNORE).sum())
        return total, tokens, torch.cat([p.grad.flatten() for p in model.parameters()]).clone()

    loss_p, tok_p, grad_p = loss_and_grads(packed)
    loss_u, tok_u, grad_u = loss_and_grads(unpacked)
    assert tok_p == tok_u
    assert abs(loss_p - loss_u) <= 1e-5 * abs(loss_u)
    assert (grad_p - grad_u).norm() <= 1e-5 * grad_u.norm()  # float32 sums in a different order
    # Unpacked rows cut to their batch's longest sample (rounded up to 8): the same loss and
    # gradients, on fewer columns.
    loss_t, tok_t, grad_t = loss_and_grads(unpacked, trim=8)
    longest = [int(unpacked.filled[c].max()) for c in np.array_split(np.arange(len(unpacked)), 4)]
    assert widths == [min(256, -(-n // 8) * 8) for n in longest] and max(widths) < 256, (widths, longest)
    assert tok_t == tok_u
    assert abs(loss_t - loss_u) <= 1e-5 * abs(loss_u)
    assert (grad_t - grad_u).norm() <= 1e-5 * grad_u.norm()
