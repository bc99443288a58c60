"""Deterministic, resumable batches for every rank.

The row stream is a function of the seed only (data_pipeline/mixing.py), and optimizer step s
consumes positions [s*B, (s+1)*B) of it, B = micro_batch x grad_accum x world. So the data
position is the step number: a resume needs nothing but the step; every rank gets exactly
micro_batch x grad_accum rows every step (unequal batch counts would hang ZeRO-3's collectives);
and layouts with the same B (8x1x1, 1x8x1, 4x1x2) train on exactly the same rows in each step.

Within a step, rank r's micro-batch m gets positions [(m*world + r)*micro, ... + micro).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from data_pipeline.mixing import MixSchedule


class StepLoader:
    def __init__(self, sources: Sequence, weights: Sequence[float], micro_batch_size: int, grad_accum_steps: int,
                 rank: int, world_size: int, seed: int) -> None:
        """sources: prepared sources (each with `filled` and `rows(idx)`), mixed by token `weights`."""
        self.sources = list(sources)
        self.micro = micro_batch_size
        self.accum = grad_accum_steps
        self.rank = rank
        self.world = world_size
        self.schedule = MixSchedule([s.filled for s in self.sources], weights, seed)

    @property
    def rows_per_step(self) -> int:
        return self.micro * self.accum * self.world

    def rows(self, step: int) -> List[List[Tuple[int, int]]]:
        """(source, row) pairs for this rank, one list per micro-batch of optimizer step `step` (0-based)."""
        out = []
        for m in range(self.accum):
            first = step * self.rows_per_step + (m * self.world + self.rank) * self.micro
            out.append(self.schedule.at(range(first, first + self.micro)))
        return out

    def micro_batches(self, step: int) -> List[Dict[str, torch.Tensor]]:
        return [self.batch(pairs) for pairs in self.rows(step)]

    def batch(self, pairs: List[Tuple[int, int]]) -> Dict[str, torch.Tensor]:
        parts = [self.sources[j].rows([i]) for j, i in pairs]
        out = {k: torch.from_numpy(np.concatenate([p[k] for p in parts])) for k in parts[0]}
        out["source"] = torch.tensor([j for j, _ in pairs])
        out["row"] = torch.tensor([i for _, i in pairs])
        out["filled"] = torch.tensor([int(self.sources[j].filled[i]) for j, i in pairs])
        out["real_tokens"] = out["filled"].sum()
        return out
