"""One optimizer step: forward and backward over this rank's micro-batches, the components'
boundary hooks (EWC adds its gradient there), DeepSpeed's clip and update, and the step's sums
reduced over ranks in one collective. Also the rule for a step whose loss or gradient is not finite.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Dict, List, Sequence

import torch

from trainer import distributed
from trainer.components import Component
from trainer.objectives import Objective, head
from trainer.objectives.token import backward_scale, supervised_tokens
from trainer.observability.metrics import StepResult

log = logging.getLogger("trainer")


def train_step(
    engine,
    micro_batches: List[Dict[str, torch.Tensor]],
    objective: Objective,
    source_names: List[str],
    components: Sequence[Component] = (),
    phase=contextlib.nullcontext,
    check_grads: bool = False,
) -> StepResult:
    """One optimizer step over this rank's micro-batches. The loss is the mean over every unit of
    the step on all ranks: supervised tokens (TokenLoss) or preference pairs (PreferenceLoss).
    `components`: their before_optimizer_step runs at the accumulation boundary, before DeepSpeed
    clips and steps. A micro-batch that carries `teacher_ids` (trainer/forgetting/distill.py) adds
    distill_weight x the mean KL to its teacher over the step's distillation tokens on all ranks,
    logged as reg/distill_penalty. A stage micro-batch that carries `target_ids`
    (trainer/forgetting/mft.py) is scored by the KL to those targets instead of its labels' cross-entropy.
    `phase(name)` times a part of the step (PerfMeter.phase). `check_grads`:
    fail if a trainable parameter got no gradient (the run's first step)."""
    device = engine.device
    # A distillation micro-batch (regularizer.distill, trainer/forgetting/distill.py) carries its
    # teacher: it is scored by the KL to it, normalised over the step's distillation tokens.
    own = [b for b in micro_batches if "teacher_ids" not in b]
    counts = torch.tensor(
        [
            [objective.count(b), supervised_tokens(b["labels"]), int(b["real_tokens"]), b["labels"].numel(), 0]
            for b in own
        ]
        + [[0, 0, 0, 0, supervised_tokens(b["labels"])] for b in micro_batches if "teacher_ids" in b],
        dtype=torch.float64,
    ).sum(0)
    distributed.all_reduce_sum(counts)
    scale = backward_scale(int(counts[0]), distributed.world_size())
    distill_scale = backward_scale(int(counts[4]), distributed.world_size())
    lr = engine.get_lr()[0]
    # Only components with a boundary hook take part (the same on every rank: the reduction's size).
    regularizers = [c for c in components if type(c).before_optimizer_step is not Component.before_optimizer_step]
    names = [c.name for c in regularizers] + (["distill"] if len(own) < len(micro_batches) else [])
    # Per source, columns [loss sum, loss units, real tokens]; then each component's penalty; then
    # the objective's metric sums (a preference stage's rewards and log-probs): one reduction.
    sums = torch.zeros(len(source_names), 3, dtype=torch.float64)
    penalties = torch.zeros(len(names), dtype=torch.float64)
    stat_sums = torch.zeros(len(objective.stats), dtype=torch.float64)
    reported = [False] * len(regularizers) + [True] * (len(names) - len(regularizers))
    nonfinite_rows = []
    for m, batch in enumerate(micro_batches):
        distilling = "teacher_ids" in batch
        with phase("forward_backward"):
            if distilling:
                weight = float(batch["distill_weight"])
                rows = head.distill_kl(engine, batch, device).sum(1)
                engine.backward(rows.sum() * weight * distill_scale, scale_wrt_gas=False)
            else:  # corrective targets (regularizer.mft): the KL to them replaces the cross-entropy
                per_token = (
                    head.distill_kl(engine, batch, device, prefix="target")
                    if "target_ids" in batch
                    else head.score(engine, batch, device, objective.uniform)
                )
                rows, row_stats = objective.rows(per_token, batch)
                engine.backward(rows.sum() * scale, scale_wrt_gas=False)
        if engine.is_gradient_accumulation_boundary():
            if check_grads:
                check_every_parameter_has_a_gradient(engine)
            for i, c in enumerate(regularizers):  # their gradient joins the loss's, before clipping
                value = c.before_optimizer_step()
                if value is not None:
                    penalties[i], reported[i] = value, True
        with phase("optimizer"):
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        row_sums = rows.detach().double().cpu()  # the step's one device -> host copy of the losses
        bad = ~torch.isfinite(row_sums)
        if bad.any():
            nonfinite_rows += [
                ("distill" if distilling else source_names[int(batch["source"][i])], int(batch["row"][i]), m)
                for i in bad.nonzero().flatten().tolist()
            ]
        if distilling:  # this rank's part of λ x the mean KL over the step's distillation tokens
            penalties[-1] += float(row_sums.sum()) * weight / max(float(counts[4]), 1.0)
            continue
        if row_stats is not None:
            stat_sums += row_stats.detach().double().sum(0).cpu()
        source = batch["source"]
        sums[:, 0].index_add_(0, source, row_sums)
        sums[:, 1].index_add_(0, source, objective.row_units(batch))
        sums[:, 2].index_add_(0, source, batch["filled"].double())
    flat = distributed.all_reduce_sum(torch.cat([sums.flatten(), penalties, stat_sums]))
    sums = flat[: sums.numel()].view_as(sums)
    penalties, stat_sums = flat[sums.numel() : sums.numel() + len(names)], flat[sums.numel() + len(names) :]
    grad_norm = engine.get_global_grad_norm()
    per_source = sums.tolist()
    return StepResult(
        loss_sum=float(sums[:, 0].sum()),
        supervised_tokens=float(counts[1]),
        real_tokens=float(counts[2]),
        slots=float(counts[3]),
        source_loss_sum=[r[0] for r in per_source],
        source_supervised=[r[1] for r in per_source],
        source_tokens=[r[2] for r in per_source],
        lr=lr,
        grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
        penalties={n: float(v) for n, v, r in zip(names, penalties.tolist(), reported) if r},
        nonfinite_rows=nonfinite_rows,
        units=float(counts[0]),
        stats=dict(zip(objective.stats, stat_sums.tolist())),
    )


def check_finite(
    step: int,
    skipped_steps: int,
    result: StepResult,
    step_rows: Sequence,
    names: List[str],
    skip: bool,
    max_skipped_steps: int,
) -> None:
    """A step with a NaN/inf loss or gradient: DeepSpeed has already dropped its update (the
    weights are as before the step). Name the step and the rows, then raise or, with `skip`
    (trainer.failure.on_nonfinite=skip), go on within `max_skipped_steps`. Called on every rank (the loss
    and DeepSpeed's overflow flag are reduced over ranks), so all ranks decide alike."""
    ranks = distributed.all_gather_object((result.nonfinite_rows, step_rows))
    culprits = [
        f"{src}:row {row} (rank {r}, micro-batch {m})" for r, (rows, _) in enumerate(ranks) for src, row, m in rows
    ]
    if culprits:
        where = f"rows with a non-finite loss: {', '.join(culprits[:20])}{' ...' if len(culprits) > 20 else ''}"
    else:  # the loss was finite everywhere: the gradient overflowed; name the whole step
        rows = [f"{names[src]}:row {row}" for _, per_micro in ranks for micro in per_micro for src, row in micro]
        where = (
            f"every row's loss was finite (the gradient overflowed); the step's rows: {', '.join(rows[:40])}"
            f"{' ...' if len(rows) > 40 else ''}"
        )
    what = (
        f"non-finite loss/gradient at step {step} (loss={result.loss}, grad_norm="
        f"{result.grad_norm}): {where}. The update was skipped; the weights are those of step {step - 1}."
    )
    if skip and skipped_steps <= max_skipped_steps:
        log.warning(
            "%s Skipped (%d of at most trainer.failure.max_skipped_steps=%d).", what, skipped_steps, max_skipped_steps
        )
        return
    if skip:
        advice = (
            f"{skipped_steps} steps skipped, more than trainer.failure.max_skipped_steps={max_skipped_steps}: "
            "the run is diverging or the data is bad."
        )
    else:
        advice = "trainer.failure.on_nonfinite=skip would skip such steps (counted in train/skipped_steps)."
    raise RuntimeError(
        f"{what} Stopped, without saving: the last checkpoint is intact. Inspect those rows "
        f"(data_pipeline: source name and row of the prepared cache) or lower trainer.optim.lr; {advice}"
    )


def check_every_parameter_has_a_gradient(engine) -> None:
    """Fail loudly after the first backward if a trainable parameter got no gradient anywhere
    (unused layer, a model-code bug, a checkpointing mode that drops the graph)."""
    from deepspeed.utils import safe_get_local_grad

    params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    norms = torch.zeros(len(params), dtype=torch.float64)
    for i, (_, p) in enumerate(params):
        g = safe_get_local_grad(p)
        if g is not None:
            norms[i] = g.detach().double().pow(2).sum().cpu()
    distributed.all_reduce_sum(norms)
    missing = [n for (n, _), v in zip(params, norms.tolist()) if v == 0.0]
    if missing:
        raise RuntimeError(
            f"{len(missing)} trainable parameters received no gradient in the first step: "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}. Check activation checkpointing "
            "(trainer.activation_checkpointing) and the model code."
        )
