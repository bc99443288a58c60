"""Unit: the step loader (rank sharding, equal batches on every rank, resume order) and token-counted
weighted mixing."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.loader import StepLoader, trim_to_longest
from data_pipeline.mixing import MixSchedule


class FakeSource:
    """Rows whose input_ids hold their own (source, row) id, so a batch says what it contains."""

    def __init__(self, source: int, n: int, tokens: int = 4):
        self.source = source
        self.filled = np.full(n, tokens)

    def __len__(self):
        return len(self.filled)

    def rows(self, idx):
        idx = np.asarray(idx)
        ids = np.stack([np.full(4, self.source * 1000 + i) for i in idx])
        return {"input_ids": ids, "labels": ids, "position_ids": np.zeros_like(ids)}


def sample_ids(loader: StepLoader, step: int):
    return [int(b["input_ids"][r, 0]) for b in loader.micro_batches(step) for r in range(len(b["input_ids"]))]


def layout(micro, accum, world, steps, n=13, seed=3):
    """Rows each step trains on, over all ranks, for a (micro, accum, world) layout."""
    src = [FakeSource(0, n)]
    return [
        sorted(i for r in range(world) for i in sample_ids(StepLoader(src, [1.0], micro, accum, r, world, seed), s))
        for s in steps
    ]


def test_layouts_with_the_same_global_batch_see_the_same_rows():
    steps = range(5)  # crosses epochs: 13 rows, 8 per step
    assert layout(8, 1, 1, steps) == layout(1, 8, 1, steps) == layout(4, 1, 2, steps) == layout(2, 2, 2, steps)


def test_every_rank_gets_the_same_number_of_rows_every_step_and_ranks_never_overlap():
    src = [FakeSource(0, 7)]  # 7 rows do not divide among 3 ranks x 2 micro-batches x 2 rows
    loaders = [StepLoader(src, [1.0], 2, 2, r, 3, seed=1) for r in range(3)]
    for step in range(6):
        per_rank = [sample_ids(lo, step) for lo in loaders]
        assert all(len(ids) == 4 for ids in per_rank)
    # Within one epoch's worth of positions each row appears once: ranks do not duplicate each other.
    first = [i for lo in loaders for i in sample_ids(lo, 0)]
    assert len(first) == 12 and set(first) == set(range(7))


def test_each_epoch_is_a_fresh_permutation():
    src = [FakeSource(0, 10)]
    lo = StepLoader(src, [1.0], 5, 1, 0, 1, seed=7)
    epochs = [sample_ids(lo, 0) + sample_ids(lo, 1), sample_ids(lo, 2) + sample_ids(lo, 3)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(10))
    assert epochs[0] != epochs[1]


@pytest.mark.parametrize("accum", [1, 3])
def test_resume_mid_epoch_in_a_later_epoch_continues_the_same_order(accum):
    """A loader built fresh at step s (what a resumed job does) yields what the uninterrupted loader
    yields at step s: mid-epoch, in epoch >= 2, with gradient accumulation, with mixing."""
    sources = [FakeSource(0, 11), FakeSource(1, 5, tokens=3)]
    straight = [StepLoader(sources, [3.0, 1.0], 2, accum, r, 2, seed=5) for r in range(2)]
    reference = {(r, s): sample_ids(straight[r], s) for r in range(2) for s in range(12)}
    for resume_at in (3, 7, 11):  # 16 or 48 rows a step over 16 rows: epochs >= 2 of both sources
        resumed = [StepLoader(sources, [3.0, 1.0], 2, accum, r, 2, seed=5) for r in range(2)]
        for s in range(resume_at, 12):
            for r in range(2):
                assert sample_ids(resumed[r], s) == reference[(r, s)], (resume_at, s, r)


def test_a_new_global_batch_from_an_origin_goes_on_from_the_row_where_the_old_one_stopped():
    """A resume that accepts a new global batch (trainer.resume.allow_new_global_batch) at step 4 of 8-row
    steps: from the origin (4, 32) the 6-row steps take rows 32-37, 38-43, ...: none skipped, none twice."""
    src = [FakeSource(0, 100)]
    old = StepLoader(src, [1.0], 4, 1, 0, 2, seed=2)  # 8 rows a step
    new = [StepLoader(src, [1.0], 3, 2, r, 1, seed=2, origin=(4, 32)) for r in range(1)]  # 6 rows a step
    seen = [i for s in range(4) for r in range(2) for i in sample_ids(StepLoader(src, [1.0], 4, 1, r, 2, seed=2), s)]
    after = [i for s in range(4, 7) for i in sample_ids(new[0], s)]
    stream = old.schedule.at(range(0, 50))
    assert seen + after == [row for _, row in stream[:50]]


def test_mixing_holds_the_token_ratio_within_two_percent_and_is_deterministic():
    rng = np.random.default_rng(0)
    general = rng.integers(200, 257, size=3000)  # rows of unequal real-token counts
    domain = rng.integers(120, 257, size=500)
    for ratio in (0.05, 0.25, 0.5):
        schedule = MixSchedule([domain, general], [1 - ratio, ratio], seed=11)
        picks = schedule.at(range(10_000))
        tokens = np.zeros(2)
        for j, i in picks:
            tokens[j] += (domain, general)[j][i]
        share = tokens[1] / tokens.sum()
        assert abs(share - ratio) <= 0.02 * ratio, (ratio, share)
        assert MixSchedule([domain, general], [1 - ratio, ratio], seed=11).at(range(10_000)) == picks
        # resume: a new schedule asked only from position 6000 on gives the same rows
        assert MixSchedule([domain, general], [1 - ratio, ratio], seed=11).at(range(6000, 10_000)) == picks[6000:]
    assert MixSchedule([domain, general], [0.75, 0.25], seed=12).at(range(100)) != MixSchedule(
        [domain, general], [0.75, 0.25], seed=11
    ).at(range(100))


def test_mixing_rejects_bad_weights():
    with pytest.raises(ValueError, match="positive sum"):
        MixSchedule([np.ones(3)], [0.0], seed=0)
    with pytest.raises(ValueError, match="source 1 has no rows but weight 1"):
        MixSchedule([np.ones(3), np.ones(0)], [1.0, 1.0], seed=0)


def test_unpacked_rows_are_cut_to_the_longest_of_their_batch():
    ids = np.arange(3 * 32).reshape(3, 32)
    rows = {"input_ids": ids, "labels": ids + 1, "position_ids": ids + 2}
    cut = trim_to_longest(rows, np.array([3, 10, 5]), 8)
    assert {k: v.shape for k, v in cut.items()} == {k: (3, 16) for k in rows}  # 10 -> 16
    assert all((cut[k] == rows[k][:, :16]).all() and cut[k].flags["C_CONTIGUOUS"] for k in rows)
    assert trim_to_longest(rows, np.array([3, 10, 5]), 1)["input_ids"].shape == (3, 10)
    assert trim_to_longest(rows, np.array([3, 30, 5]), 8)["input_ids"].shape == (3, 32)  # never wider
    assert trim_to_longest(rows, np.array([0, 0, 0]), 8)["input_ids"].shape == (3, 8)  # never empty


class RaggedSource(FakeSource):
    """Right-padded rows of 64 with 5 + 7*i real tokens (i = row)."""

    def __init__(self, n: int):
        super().__init__(0, n)
        self.filled = np.array([5 + 7 * i for i in range(n)])

    def rows(self, idx):
        return {k: np.repeat(v, 16, axis=1) for k, v in super().rows(idx).items()}  # width 64


def test_the_loader_pads_unpacked_batches_to_their_longest_row_and_leaves_packed_rows_whole():
    src = RaggedSource(8)
    for step in range(3):
        for b in StepLoader([src], [1.0], 2, 2, 0, 1, seed=1, pad_to_multiple_of=4).micro_batches(step):
            assert b["input_ids"].shape[1] == min(64, -(-int(b["filled"].max()) // 4) * 4)
            assert b["labels"].shape == b["position_ids"].shape == b["input_ids"].shape
        assert all(
            b["input_ids"].shape[1] == 64 for b in StepLoader([src], [1.0], 2, 2, 0, 1, seed=1).micro_batches(step)
        )
