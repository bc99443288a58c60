"""What DeepSpeed 0.19.8's universal checkpoints need to be right and fast under ZeRO-3, kept apart
from the conversion's logic (reshard.py) so an upgrade knows what to re-check:

- `fix_optimizer_after_universal_load`: its loader shares one `step` tensor across sub-groups and
  copies group 0's hyper-parameters into every param group.
- `mapped_parameter_files`: its loader reads every parameter file whole on every rank; mapped, each
  rank reads its slice.
- `slim_optimizer_state`: the common optimizer state it writes holds rank 0's whole shard.
- `deepspeed_globals`: the classes its state files hold besides tensors, for weights_only loads.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from trainer.checkpointing.layout import ReshardError


def slim_optimizer_state(path: Path) -> None:
    """DeepSpeed stores rank 0's whole optimizer shard (fp32 weights and both moments) as the
    universal checkpoint's common state, which every rank then reads in full; keep what the
    loader uses of it (the step, the param groups, the loss-scaler state)."""
    with deepspeed_globals():
        sd = torch.load(path, map_location="cpu", weights_only=True)
    sd.pop("fp32_flat_groups", None)
    inner = sd.get("optimizer_state_dict", {})
    inner["state"] = {k: {"step": v["step"]} for k, v in inner.get("state", {}).items() if "step" in v}
    torch.save(sd, path)


def deepspeed_globals():
    """What DeepSpeed's optimizer-state file holds besides tensors and plain containers (its ZeRO
    stage enum and loss-scaler object), allowed for weights_only loading."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler])


class MappedLoads:
    """`torch` as DeepSpeed's ZeRO-3 optimizer module sees it, except that torch.load of a universal
    parameter file (zero/<name>/fp32.pt, exp_avg.pt, exp_avg_sq.pt) maps it instead of reading it:
    each rank takes only its slice of every parameter, so it reads ~1/world of the files, not all."""

    FILES = ("fp32.pt", "exp_avg.pt", "exp_avg_sq.pt")

    def __init__(self, real) -> None:
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def load(self, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and os.path.basename(f) in self.FILES:
            kwargs.setdefault("mmap", True)
        return self._real.load(f, *args, **kwargs)


@contextlib.contextmanager
def mapped_parameter_files():
    from deepspeed.runtime.zero import stage3

    real = stage3.torch
    stage3.torch = MappedLoads(real)
    try:
        yield
    finally:
        stage3.torch = real


def fix_optimizer_after_universal_load(zero_optimizer, common: Path) -> None:
    """After DeepSpeed 0.19.8's ZeRO-3 universal load: one `step` tensor per sub-group (it shares one,
    which Adam then increments once per sub-group), and each param group's own hyper-parameters
    (it copies group 0's into all: the no-decay group would get weight decay)."""
    inner = zero_optimizer.optimizer
    for flat in zero_optimizer.fp32_partitioned_groups_flat:
        state = inner.state.get(flat, {})
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    with deepspeed_globals():
        saved = torch.load(common, map_location="cpu", weights_only=True)["optimizer_state_dict"]["param_groups"]
    if len(saved) != len(inner.param_groups):
        raise ReshardError(
            f"{common}: {len(saved)} optimizer param groups saved, this run has {len(inner.param_groups)} "
            "(another optimizer setup?)"
        )
    for group, kept in zip(inner.param_groups, saved):
        for key, value in kept.items():
            if key != "params":
                group[key] = value
