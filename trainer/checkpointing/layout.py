"""How a run's steps are cut over ranks, and what a resume on another number of ranks keeps.

A step trains B = micro_batch_size x grad_accum_steps x world_size rows. A checkpoint records the
layout it was trained with; a resume on another world size keeps B (deriving grad_accum_steps), so
the data position (= the step, data_pipeline/loader.py), the schedule and the gradient noise go on
as they were, or, with trainer.resume.allow_new_global_batch, moves the data origin so no row is skipped or
seen twice. Pure arithmetic on files and numbers: no engine, no collective. The conversion of the
weights themselves is reshard.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import List, Optional, Sequence

import torch

log = logging.getLogger("trainer")


class ReshardError(RuntimeError):
    """A checkpoint cannot be resumed on this world size; the message says what to do."""


# ---- the global batch ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a checkpoint's steps were cut: B = micro_batch_size x grad_accum_steps x world_size rows."""

    world_size: int
    micro_batch_size: int
    grad_accum_steps: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.micro_batch_size * self.grad_accum_steps

    def describe(self) -> str:
        return (
            f"{self.world_size} ranks x micro {self.micro_batch_size} x accumulation {self.grad_accum_steps} = "
            f"{self.global_batch} rows a step"
        )


def saved_layout(output_dir: str) -> Optional[Layout]:
    """The layout of the checkpoint `checkpoints/latest` names, read from files alone (before any
    engine exists); None when there is none. A checkpoint written before the layout was recorded:
    the world from its optimizer shards, the batch from the previous start's output_dir/config.yaml."""
    out = Path(output_dir)
    ckpt = out / "checkpoints"
    try:
        path = ckpt / (ckpt / "latest").read_text().strip()
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None  # none, or damaged: resume() names the problem (and may fall back)
    if state.get("world_size"):
        return Layout(state["world_size"], state["micro_batch_size"], state["grad_accum_steps"])
    world = len(list(path.glob("*_optim_states.pt")))
    try:
        from omegaconf import OmegaConf

        trainer = OmegaConf.to_container(OmegaConf.load(out / "config.yaml"))["trainer"]
        return Layout(world, int(trainer["micro_batch_size"]), int(trainer["grad_accum_steps"])) if world else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve_batch(
    micro: int,
    accum: Optional[int],
    global_batch: Optional[int],
    world: int,
    saved: Optional[Layout],
    allow_new: bool = False,
    elastic: bool = True,
) -> int:
    """grad_accum_steps for this run: `accum` if fixed, else derived from trainer.global_batch_size,
    else (a resume) from the checkpoint's global batch, else 1. Raises ReshardError, naming the
    settings that keep the checkpoint's global batch, when they cannot be kept (unless `allow_new`)."""
    fixed = accum
    if global_batch is not None:
        per_step = micro * world
        if global_batch % per_step:
            raise ReshardError(
                f"trainer.global_batch_size={global_batch} is not a multiple of trainer.micro_batch_size={micro} x "
                f"{world} ranks = {per_step}; choose a global batch that is, or another micro-batch "
                f"({_divisors_text(global_batch, world)})"
            )
        derived = global_batch // per_step
        if accum is not None and accum != derived:
            raise ReshardError(
                f"trainer.grad_accum_steps={accum} and trainer.global_batch_size={global_batch} disagree "
                f"on {world} ranks at micro-batch {micro} (it needs {derived}); set only one of them"
            )
        fixed = derived
    if saved is None:
        return fixed if fixed is not None else 1
    if saved.world_size != world and not elastic:
        return fixed if fixed is not None else saved.grad_accum_steps  # resume() refuses, with its message
    target = saved.global_batch
    if fixed is None and target % (micro * world) == 0:
        return target // (micro * world)
    if fixed is not None and micro * fixed * world == target:
        return fixed
    if allow_new:
        return fixed if fixed is not None else max(1, target // (micro * world))
    if fixed is None:
        problem = f"trainer.micro_batch_size={micro} x {world} ranks does not divide it"
    else:
        which = (
            f"trainer.global_batch_size={global_batch}"
            if global_batch is not None
            else f"trainer.micro_batch_size={micro} x trainer.grad_accum_steps={accum} x {world} ranks"
        )
        problem = f"this run asks for {which} = {micro * fixed * world}"
    raise ReshardError(
        f"the checkpoint to resume was trained with a global batch of {saved.describe()}, and {problem}. To keep "
        f"it on {world} ranks: {_keep_text(target, micro, world)}. Or accept a new global batch from this step on "
        "with trainer.resume.allow_new_global_batch=true: the data then goes on from the row where the checkpoint "
        "stopped, and every later step trains on the new number of rows with the learning-rate schedule "
        "unchanged in steps."
    )


def _keep_text(target: int, micro: int, world: int) -> str:
    if target % world:
        return (
            f"not possible ({target} rows are not divisible by {world} ranks); run on a number of ranks that "
            f"divides {target}"
        )
    options = [
        f"trainer.micro_batch_size={m} trainer.grad_accum_steps={target // world // m}"
        for m in _divisors(target // world)
        if m <= max(micro, 1) * 4
    ][-3:]
    return "set " + " or ".join(options) + " (or leave trainer.grad_accum_steps unset: it is then derived)"


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _divisors_text(global_batch: int, world: int) -> str:
    if global_batch % world:
        return f"{global_batch} is not divisible by {world} ranks at all"
    return "micro-batches that divide it: " + ", ".join(str(d) for d in _divisors(global_batch // world)[:8])


# ---- re-cutting per-rank partitions ------------------------------------------------------------------


def partition(full: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s ZeRO-3 slice of a flat tensor: ceil(n / world) elements, zero-padded at the end."""
    full = full.reshape(-1)
    size = math.ceil(full.numel() / world)
    if size * world != full.numel():
        full = torch.cat([full, full.new_zeros(size * world - full.numel())])
    return full.narrow(0, rank * size, size).clone()


def repartition(slices: Sequence[torch.Tensor], numel: int, world: int, rank: int) -> torch.Tensor:
    """`slices` (one per old rank, in rank order, each ceil(numel / len(slices)) long) re-cut for
    `rank` of `world`: the same elements, the padding of the old cut dropped and the new one added."""
    old = len(slices)
    size = math.ceil(numel / old)
    bad = [i for i, s in enumerate(slices) if s.numel() != size]
    if bad:
        raise ReshardError(
            f"partition of {numel} elements over {old} ranks: rank {bad[0]}'s slice has "
            f"{slices[bad[0]].numel()} elements, {size} expected (saved by another model?)"
        )
    return partition(torch.cat([s.reshape(-1) for s in slices])[:numel], world, rank)


def resolve_config_batch(cfg, world: int):
    """cfg (trainer.config.Config) with trainer.grad_accum_steps settled for `world` ranks: as set,
    from trainer.global_batch_size, or (resuming) what keeps the checkpoint's global batch."""
    t = cfg.trainer
    saved = saved_layout(cfg.output_dir)
    accum = resolve_batch(
        t.micro_batch_size,
        t.grad_accum_steps,
        t.global_batch_size,
        world,
        saved,
        t.resume.allow_new_global_batch,
        t.resume.elastic,
    )
    if saved is not None and saved.world_size != world and t.resume.elastic:
        log.info(
            "resuming a checkpoint of %s on %d ranks: micro %d x accumulation %d x %d ranks = %d rows a step",
            saved.describe(),
            world,
            t.micro_batch_size,
            accum,
            world,
            t.micro_batch_size * accum * world,
        )
    return dataclasses.replace(cfg, trainer=dataclasses.replace(t, grad_accum_steps=accum))


def continue_data(state, t, world: int) -> None:
    """Record this run's layout in the state (a TrainState, saved with each checkpoint); when a resume
    accepted a new global batch (trainer.resume.allow_new_global_batch), move the data origin to the row
    where the checkpoint stopped, so no row is skipped or seen twice."""
    saved, batch = state.layout(), t.micro_batch_size * t.grad_accum_steps * world
    if saved is not None and saved.global_batch != batch:
        if not t.resume.allow_new_global_batch:  # the checkpoint resumed is not the one `latest` named (fallback)
            raise ReshardError(
                f"the checkpoint resumed (step {state.step}) was trained with {saved.describe()}, this run has "
                f"{batch} rows a step; set trainer.grad_accum_steps so that they agree, or "
                "trainer.resume.allow_new_global_batch=true"
            )
        origin_step, origin_row = state.data_origin
        row = origin_row + (state.step - origin_step) * saved.global_batch
        state.data_origin = [state.step, row]
        log.warning(
            "global batch %d -> %d rows from step %d on (trainer.resume.allow_new_global_batch): the data goes on from "
            "row %d; the learning-rate schedule stays in steps, so the remaining %d steps train on %+.0f%% "
            "rows each",
            saved.global_batch,
            batch,
            state.step,
            row,
            max(t.max_steps - state.step, 0),
            100 * (batch / saved.global_batch - 1),
        )
    state.world_size, state.micro_batch_size, state.grad_accum_steps = world, t.micro_batch_size, t.grad_accum_steps
