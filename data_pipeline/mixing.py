"""Weighted mixing of sources, counted in tokens, deterministic and resumable.

The global row stream is a pure function of the seed: position p (the p-th row the whole job
consumes) comes from the source whose token share lags its target most, and that source's next row
in its own shuffled order (reshuffled every epoch of that source). Because rows are drawn by
deficit rather than by chance, a 5% replay ratio is 5% of the tokens after a few hundred rows, not
on average; and because it depends on nothing but the seed and p, a resumed job continues the
exact stream.

    weights [3, 1], rows of 10 tokens: sources 0 0 1 0 | 0 0 1 0 | ...  (tokens 30:10 = 75%:25%)
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np


class MixSchedule:
    def __init__(self, row_tokens: Sequence[np.ndarray], weights: Sequence[float], seed: int) -> None:
        """row_tokens[j][i]: real tokens in row i of source j; weights: target token shares (any scale)."""
        if len(row_tokens) != len(weights) or not row_tokens:
            raise ValueError("one weight per source is needed")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"mixing weights must be >= 0 with a positive sum, got {list(weights)}")
        for j, rows in enumerate(row_tokens):
            if len(rows) == 0 and weights[j] > 0:
                raise ValueError(f"source {j} has no rows but weight {weights[j]}")
        self.row_tokens = [np.asarray(r, dtype=np.int64) for r in row_tokens]
        total = float(sum(weights))
        self.share = np.asarray([w / total for w in weights], dtype=np.float64)
        self.seed = seed
        self._source = np.zeros(0, dtype=np.int32)
        self._row = np.zeros(0, dtype=np.int64)
        # Generator state: rows drawn and tokens taken per source so far.
        self._drawn = np.zeros(len(weights), dtype=np.int64)
        self._tokens = np.zeros(len(weights), dtype=np.float64)
        self._orders: dict = {}

    def order(self, source: int, epoch: int) -> np.ndarray:
        """Source `source`'s row order in `epoch` (a permutation; a function of seed, source, epoch)."""
        key = (source, epoch)
        if key not in self._orders:
            if len(self._orders) > 64:
                self._orders.clear()
            self._orders[key] = np.random.default_rng([self.seed, source, epoch]).permutation(
                len(self.row_tokens[source])
            )
        return self._orders[key]

    def _extend(self, upto: int) -> None:
        n = len(self._source)
        if upto <= n:
            return
        upto = max(upto, 2 * n, 1024)
        if np.count_nonzero(self.share) == 1:  # one source: its rows in order, epoch after epoch
            j = int(np.argmax(self.share))
            length = len(self.row_tokens[j])
            drawn = np.arange(self._drawn[j], self._drawn[j] + upto - n)
            epochs = drawn // length
            rows = np.empty(len(drawn), dtype=np.int64)
            for e in np.unique(epochs):
                sel = epochs == e
                rows[sel] = self.order(j, int(e))[drawn[sel] % length]
            sources = np.full(len(drawn), j, dtype=np.int32)
            self._drawn[j] += len(drawn)
        else:
            share = self.share.tolist()
            tokens = self._tokens.tolist()
            drawn_per = self._drawn.tolist()
            total = sum(tokens)
            sources = np.empty(upto - n, dtype=np.int32)
            rows = np.empty(upto - n, dtype=np.int64)
            for k in range(upto - n):
                # The source whose tokens lag its share most (ties: the lower index).
                lag = [share[i] * (total + 1.0) - tokens[i] for i in range(len(share))]
                j = lag.index(max(lag))
                length = len(self.row_tokens[j])
                drawn = drawn_per[j]
                row = int(self.order(j, drawn // length)[drawn % length])
                drawn_per[j] += 1
                got = int(self.row_tokens[j][row])
                tokens[j] += got
                total += got
                sources[k], rows[k] = j, row
            self._tokens = np.asarray(tokens, dtype=np.float64)
            self._drawn = np.asarray(drawn_per, dtype=np.int64)
        self._source = np.concatenate([self._source, sources])
        self._row = np.concatenate([self._row, rows])

    def at(self, positions: Sequence[int]) -> List[Tuple[int, int]]:
        """(source, row) for each global stream position."""
        positions = list(positions)
        if positions:
            self._extend(max(positions) + 1)
        return [(int(self._source[p]), int(self._row[p])) for p in positions]
