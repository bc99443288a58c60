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

import bisect
from typing import List, Sequence, Tuple

import numpy as np

IGNORE = -100


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Bins of sample indices, each summing to at most `capacity`: longest first, each into the
    fullest bin that still has room (ties keep input order, so the result is deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: List[List[int]] = []
    free: List[Tuple[int, int]] = []  # (room left, bin id), sorted
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than the row length {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (room - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
    return bins


def pack_rows(samples: Sequence[Tuple[List[int], List[int]]], bins: Sequence[Sequence[int]], seq_len: int,
              pad_id: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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
            input_ids[r, at:at + k] = ids
            labels[r, at:at + k] = lab
            labels[r, at] = IGNORE
            position_ids[r, at:at + k] = np.arange(k)
            at += k
        # The padding tail is a document of its own (positions restart at 0), so no real token
        # attends to it and it attends to nothing real.
        position_ids[r, at:] = np.arange(seq_len - at)
        filled[r] = at
    return input_ids, labels, position_ids, filled


def chunk_documents(samples: Sequence[Tuple[List[int], List[int]]], seq_len: int) -> List[List[Tuple[List[int], List[int]]]]:
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
            rows[-1].append((ids[start:start + take], lab[start:start + take]))
            room -= take
            start += take
    return rows if rows[0] else []
