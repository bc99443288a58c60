"""Deterministic, resumable batches for every rank.

The sample order is a function of (seed, epoch) only, and optimizer step s consumes rows
[s*B, (s+1)*B) of that order, B = micro_batch x grad_accum x world. So the data position is the
step number: a resume needs nothing but the step, and layouts with the same B (8x1x1, 1x8x1,
4x1x2) train on exactly the same rows in each step.

Within a step, rank r's micro-batch m gets rows [(m*world + r)*micro, ... + micro).
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch

from data_pipeline.dataset import PackedData


class StepLoader:
    def __init__(self, data: PackedData, micro_batch_size: int, grad_accum_steps: int, rank: int,
                 world_size: int, seed: int) -> None:
        self.data = data
        self.micro = micro_batch_size
        self.accum = grad_accum_steps
        self.rank = rank
        self.world = world_size
        self.seed = seed
        self._orders: Dict[int, np.ndarray] = {}

    @property
    def rows_per_step(self) -> int:
        return self.micro * self.accum * self.world

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.data))}
        return self._orders[epoch]

    def rows(self, step: int) -> List[List[int]]:
        """Row indices for this rank, one list per micro-batch of optimizer step `step` (0-based)."""
        n = len(self.data)
        out = []
        for m in range(self.accum):
            first = step * self.rows_per_step + (m * self.world + self.rank) * self.micro
            out.append([int(self._order(p // n)[p % n]) for p in range(first, first + self.micro)])
        return out

    def micro_batches(self, step: int) -> List[Dict[str, torch.Tensor]]:
        return [self.batch(idx) for idx in self.rows(step)]

    def batch(self, idx: List[int]) -> Dict[str, torch.Tensor]:
        return {"input_ids": torch.from_numpy(self.data.input_ids[idx]),
                "labels": torch.from_numpy(self.data.labels[idx]),
                "position_ids": torch.from_numpy(self.data.position_ids[idx]),
                "real_tokens": torch.tensor(int(self.data.filled[idx].sum()))}
