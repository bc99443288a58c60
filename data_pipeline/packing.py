"""Packing: put many samples into fixed-length rows without wasting compute on padding, and without
letting one sample attend to another.

Each document in a row gets position_ids that restart at 0. With attention_mask=None and no KV
cache, transformers turns those restarts into a block-diagonal causal mask (sdpa/eager), so a
document sees only itself. Its first label is -100: the model is never asked to predict a
document's first token from the previous document.

    row:          [a0 a1 a2 | b0 b1 | pad]
    position_ids: [0  1  2  | 0  1  | 0  ]
    labels:       [-  a1 a2 | -  b1 | -  ]   (- = -100; the loss shifts labels left by one)
"""

from __future__ import annotations

import heapq
from typing import List, Sequence, Tuple

import numpy as np

IGNORE = -100  # the label of a position without loss (PyTorch cross_entropy ignore_index); the one definition


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Bins of sample indices, each summing to at most `capacity`: longest first, each into the
    fullest bin that still has room (ties keep input order, so the result is deterministic).

    Exact rule: samples in order of (-length, index); each goes into the bin with the least room
    that is >= its length, the lowest bin id among equal rooms, else into a new bin. A length over
    `capacity` (or below 0) raises ValueError naming the sample. Cost per sample: a few heap steps
    and bit operations over capacity/64 words; 1M samples at capacity 4096 take under a second.
    """
    arr = np.asarray(lengths)
    if arr.size == 0:
        return []
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise TypeError(f"lengths must be a 1-D sequence of integers, got dtype {arr.dtype} shape {arr.shape}")
    # Longest first, ties by index: a stable sort of the negated lengths.
    order = np.argsort(-arr.astype(np.int64), kind="stable")
    if arr[order[0]] > capacity:
        i = int(order[0])
        raise ValueError(f"sample {i} has {int(arr[i])} tokens, more than the row length {capacity}")
    if arr[order[-1]] < 0:
        i = int(order[-1])
        raise ValueError(f"sample {i} has a negative length {int(arr[i])}")

    # Rooms are integers in [0, capacity], so instead of a sorted list of (room, bin) we keep, per
    # room value r, a min-heap of the ids of the bins with exactly r tokens free (`by_room[r]`), and
    # one Python int as a bitset whose bit r is set while `by_room[r]` is non-empty. "The least room
    # >= n" is then the lowest set bit of `free >> n`, found in C over capacity/64 machine words.
    # Capacity 8, bins 0 and 2 with room 3, bin 1 with room 5: free = 0b000101000 (bits 3 and 5),
    # by_room[3] = [0, 2], by_room[5] = [1]. A sample of 2: free >> 2 = 0b0001010, lowest set bit
    # 1, so r = 2 + 1 = 3 and bin 0 (the lowest id at room 3) takes it; bin 0 moves to room 1.
    by_room: List[List[int]] = [[] for _ in range(capacity + 1)]
    free = 0
    bins: List[List[int]] = []
    heappush, heappop = heapq.heappush, heapq.heappop
    for i, n in zip(order.tolist(), arr[order].tolist()):
        fits = free >> n
        if fits:
            r = n + (fits & -fits).bit_length() - 1
            heap = by_room[r]
            b = heappop(heap)
            if not heap:
                free ^= 1 << r
            bins[b].append(i)
            r -= n
        else:
            b = len(bins)
            bins.append([i])
            r = capacity - n
        heap = by_room[r]
        if not heap:
            free |= 1 << r
        heappush(heap, b)
    return bins


def pack_rows(
    samples: Sequence[Tuple[List[int], List[int]]], bins: Sequence[Sequence[int]], seq_len: int, pad_id: int
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """input_ids, labels, position_ids arrays of shape [len(bins), seq_len] for the given bins, and
    the number of real (non-padding) tokens in each row."""
    n = len(bins)
    input_ids = np.full((n, seq_len), pad_id, dtype=np.int64)
    labels = np.full((n, seq_len), IGNORE, dtype=np.int64)
    position_ids = np.zeros((n, seq_len), dtype=np.int64)
    filled = np.zeros(n, dtype=np.int64)
    for r, members in enumerate(bins):
        at = 0
        for i in members:
            ids, lab = samples[i]
            k = len(ids)
            input_ids[r, at : at + k] = ids
            labels[r, at : at + k] = lab
            labels[r, at] = IGNORE
            position_ids[r, at : at + k] = np.arange(k)
            at += k
        # The padding tail is a document of its own (positions restart at 0), so no real token
        # attends to it and it attends to nothing real.
        position_ids[r, at:] = np.arange(seq_len - at)
        filled[r] = at
    return input_ids, labels, position_ids, filled


def chunk_documents(
    samples: Sequence[Tuple[List[int], List[int]]], seq_len: int
) -> List[List[Tuple[List[int], List[int]]]]:
    """Continued pretraining: documents back to back, cut into rows of seq_len; a document that
    crosses a row boundary continues at position 0 of the next row. Returns each row's pieces."""
    rows: List[List[Tuple[List[int], List[int]]]] = [[]]
    room = seq_len
    for ids, lab in samples:
        start = 0
        while start < len(ids):
            if room == 0:
                rows.append([])
                room = seq_len
            take = min(room, len(ids) - start)
            rows[-1].append((ids[start : start + take], lab[start : start + take]))
            room -= take
            start += take
    return rows if rows[0] else []
