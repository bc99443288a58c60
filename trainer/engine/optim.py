"""AdamW with decoupled weight decay (none on biases and norms) and a warmup + cosine/constant
learning-rate schedule."""

from __future__ import annotations

import functools
import math

import torch

from trainer.config import TrainerConfig


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr for 0-based optimizer step `step`.

    Linear warmup reaches 1.0 at step warmup_steps-1; cosine then decays to min_ratio at max_steps-1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - 1 - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model, cfg: TrainerConfig, cpu_offload: bool):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # 1-D tensors (biases, norm scales) keep their scale; decaying them only hurts.
            (no_decay if getattr(p, "ds_shape", p.shape).__len__() < 2 else decay).append(p)
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps)
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    else:
        optimizer = torch.optim.AdamW(groups, **kwargs)
    schedule = functools.partial(
        lr_multiplier,
        warmup_steps=cfg.schedule.warmup_steps,
        max_steps=cfg.max_steps,
        schedule=cfg.schedule.decay,
        min_ratio=cfg.schedule.min_lr_ratio,
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
