"""Held-out evaluation: token-weighted loss and perplexity per named set.

Under ZeRO-3 every forward is collective (parameters are gathered layer by layer), so every rank
runs the same number of forwards; a rank with no rows left runs a fully masked row that adds
nothing to the sums.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from data_pipeline.loader import trim_to_longest
from data_pipeline.prepare import Prepared
from data_pipeline.packing import IGNORE
from trainer import distributed
from trainer.loss import supervised_tokens, token_loss_sum


@torch.no_grad()
def evaluate(engine, sets: Dict[str, Prepared], micro_batch_size: int, rank: int, world_size: int,
             device: torch.device, pad_to_multiple_of: Optional[int] = None) -> Dict[str, float]:
    """Mean token loss (and perplexity) of each held-out set, over all ranks. pad_to_multiple_of:
    unpacked rows are cut to the longest of each micro-batch (data_pipeline.loader.trim_to_longest)."""
    metrics: Dict[str, float] = {}
    was_training = engine.module.training
    engine.eval()
    for name, data in sets.items():
        per_round = micro_batch_size * world_size
        rounds = math.ceil(len(data) / per_round)
        sums = torch.zeros(2, dtype=torch.float64)
        for r in range(rounds):
            idx = [i for i in range(r * per_round + rank * micro_batch_size, r * per_round + (rank + 1) * micro_batch_size)
                   if i < len(data)]
            real = bool(idx)
            idx = idx or [0]
            rows = data.rows(idx)
            if pad_to_multiple_of:
                rows = trim_to_longest(rows, data.filled[idx], pad_to_multiple_of)
            labels = torch.from_numpy(rows["labels"])
            if not real:
                labels = torch.full_like(labels, IGNORE)
            out = engine(input_ids=torch.from_numpy(rows["input_ids"]).to(device),
                         position_ids=torch.from_numpy(rows["position_ids"]).to(device), use_cache=False)
            sums[0] += token_loss_sum(out.logits, labels).double().cpu()
            sums[1] += supervised_tokens(labels)
        distributed.all_reduce_sum(sums)
        loss = (sums[0] / sums[1].clamp(min=1)).item()
        metrics[f"eval/{name}/loss"] = loss
        metrics[f"eval/{name}/ppl"] = math.exp(min(loss, 50.0))
    if was_training:
        engine.train()
    return metrics


def forgetting_metrics(scores: Dict[str, float], baseline: Dict[str, float]) -> Dict[str, float]:
    """eval/forgetting = general-set loss now minus at step 0 (> 0: the model forgot);
    eval/domain_gain = domain-set loss at step 0 minus now (> 0: the model learned the domain)."""
    out = {}
    for key, name, sign in (("eval/general/loss", "eval/forgetting", 1.0), ("eval/domain/loss", "eval/domain_gain", -1.0)):
        if key in scores and key in baseline:
            out[name] = sign * (scores[key] - baseline[key])
    return out
