"""Unit: best-fit-decreasing bins on literal inputs, against a naive reference, and its invariants."""

from __future__ import annotations

import random
from typing import List, Sequence

import numpy as np
import pytest

from data_pipeline.packing import best_fit_decreasing


def reference_bfd(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """The rule, spelt out in O(n * bins): longest first (ties by index), into the bin with the least
    room that still fits, the lowest bin id among equal rooms, else a new bin."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: List[List[int]] = []
    rooms: List[int] = []
    for i in order:
        best = None
        for b, room in enumerate(rooms):
            if room >= lengths[i] and (best is None or room < rooms[best]):
                best = b
        if best is None:
            bins.append([i])
            rooms.append(capacity - lengths[i])
        else:
            bins[best].append(i)
            rooms[best] -= lengths[i]
    return bins


def check_invariants(bins: List[List[int]], lengths: Sequence[int], capacity: int) -> None:
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # every index exactly once
    assert all(b for b in bins)
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)


@pytest.mark.parametrize(
    "lengths, capacity, bins",
    [
        ([], 8, []),
        ([8], 8, [[0]]),
        ([4, 4, 4, 4], 8, [[0, 1], [2, 3]]),
        # Ties keep input order: 3(i0) opens bin 0 (room 3), 3(i1) fills it, 3(i2) opens bin 1.
        ([3, 3, 3], 6, [[0, 1], [2]]),
        # Sorted 5(i1) 4(i3) 3(i0) 2(i2) 1(i4), capacity 6: 5 -> bin0 (room 1); 4 -> bin1 (room 2);
        # 3 -> bin2 (room 3, nothing else fits); 2 -> bin1, the least room >= 2 (room 0); 1 -> bin0 (room 0).
        ([3, 5, 2, 4, 1], 6, [[1, 4], [3, 2], [0]]),
        # Best fit, not first fit: 5(i0) -> bin0 (room 2); 3(i1) -> bin1 (room 4); 3(i2) -> bin1 (room 1);
        # 1(i3) -> bin1, the fullest bin that fits (room 1), where first fit would pick bin0 (room 2).
        ([5, 3, 3, 1], 7, [[0], [1, 2, 3]]),
        # Equal rooms go to the lowest bin id, not the bin that reached that room first:
        # 11(i0) -> bin0 (room 9); 10(i1) -> bin1 (room 10); 10(i2) -> bin1 (room 0, reached first);
        # 9(i3) -> bin0 (room 0); the empty sample (i4) fits both rooms 0 and goes to bin 0.
        ([11, 10, 10, 9, 0], 20, [[0, 3, 4], [1, 2]]),
    ],
)
def test_by_hand(lengths, capacity, bins):
    assert best_fit_decreasing(lengths, capacity) == bins
    assert reference_bfd(lengths, capacity) == bins


def test_numpy_input_gives_the_same_python_ints():
    lengths = [3, 5, 2, 4, 1]
    bins = best_fit_decreasing(np.array(lengths, dtype=np.int32), 6)
    assert bins == best_fit_decreasing(lengths, 6)
    assert all(type(i) is int for b in bins for i in b)


@pytest.mark.parametrize("seed", range(300))
def test_matches_the_naive_reference_on_small_random_inputs(seed):
    rng = random.Random(seed)
    capacity = rng.randint(1, 30)  # small capacities: many equal lengths and equal rooms, so ties matter
    lengths = [rng.randint(0, capacity) for _ in range(rng.randint(0, 80))]
    bins = best_fit_decreasing(lengths, capacity)
    assert bins == reference_bfd(lengths, capacity)
    check_invariants(bins, lengths, capacity)


@pytest.mark.parametrize("capacity", [2048, 4096])
def test_matches_the_reference_on_long_tailed_lengths(capacity):
    rng = np.random.default_rng(capacity)
    lengths = np.minimum(np.maximum(np.rint(rng.lognormal(np.log(250), 1.0, 3000)), 1), capacity).astype(int)
    bins = best_fit_decreasing(lengths, capacity)
    assert bins == reference_bfd(lengths.tolist(), capacity)
    check_invariants(bins, lengths.tolist(), capacity)
    assert best_fit_decreasing(lengths, capacity) == bins  # deterministic


def test_invariants_at_scale():
    rng = np.random.default_rng(0)
    capacity = 2048
    lengths = np.minimum(np.maximum(np.rint(rng.lognormal(np.log(250), 1.0, 100_000)), 1), capacity).astype(np.int64)
    bins = best_fit_decreasing(lengths, capacity)
    flat = np.concatenate([np.asarray(b) for b in bins])
    assert np.array_equal(np.sort(flat), np.arange(len(lengths)))
    fill = np.array([lengths[b].sum() for b in bins])
    assert fill.max() <= capacity
    assert lengths.sum() / (len(bins) * capacity) > 0.99


def test_error_names_the_sample_that_is_too_long():
    # The longest over-length sample is reported (it is the first one BFD meets).
    with pytest.raises(ValueError, match=r"sample 3 has 10 tokens, more than the row length 8"):
        best_fit_decreasing([3, 9, 2, 10], 8)
    with pytest.raises(ValueError, match=r"sample 1 has a negative length -1"):
        best_fit_decreasing([3, -1], 8)
    with pytest.raises(TypeError, match="integers"):
        best_fit_decreasing([1.5, 2.0], 8)
