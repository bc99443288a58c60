"""EWC on ZeRO-3 shards: each rank keeps the anchor θ* and the Fisher F only for its own local fp32
partition of every parameter (8 bytes per parameter / world size), and adds λ·F⊙(θ−θ*) to its
local gradient partition at the optimizer-step boundary, before DeepSpeed clips and steps. No
parameter is ever gathered. The math is in ewc_math.py; this file only maps it onto the shards
with DeepSpeed's safe_get_local_fp32_param / safe_get_local_grad / safe_set_local_grad.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import torch

from trainer import distributed
from trainer.components import Component
from trainer.forgetting import ewc_math
from trainer.objectives import head
from trainer.objectives.token import backward_scale, row_loss_sums, sampled_labels, supervised_tokens

log = logging.getLogger("trainer")


class EWC(Component):
    """The regulariser, as a component of the loop: at the start of a fresh stage it anchors at the
    current weights and estimates the Fisher on `reference` (a resumed stage has both from its
    checkpoint: the checkpointer saves and restores this object); at each optimizer-step boundary
    it adds its gradient (reg/ewc_penalty)."""

    name = "ewc"

    def __init__(
        self,
        engine,
        lam: float,
        gamma: float = 1.0,
        normalise: bool = True,
        reference=None,
        labels: str = "data",
        seed: int = 0,
        previous: Optional[str] = None,
    ) -> None:
        """reference: the Fisher's batches (a BatchSource; its step 0 is this rank's share). labels:
        `data` (the reference data's own labels) or `sampled` (drawn from the model, seeded per rank
        from `seed`). previous: an earlier stage's output_dir whose Fisher joins this one (online EWC)."""
        self.lam = lam
        self.gamma = gamma
        self.normalise = normalise
        self.params = [p for p in engine.module.parameters() if p.requires_grad]
        self.anchor: List[torch.Tensor] = []
        self.fisher: List[torch.Tensor] = []
        self.engine, self.reference, self.labels, self.seed, self.previous = engine, reference, labels, seed, previous

    def on_start(self, state, tracker) -> None:
        if self.ready:
            return
        rank, world = distributed.rank(), distributed.world_size()
        loss_fn = reference_loss
        if str(self.labels) == "sampled":  # the model's own predictions as targets, seeded per rank
            draws = torch.Generator(device=self.engine.device).manual_seed(self.seed * 1_000_003 + rank)
            loss_fn = functools.partial(reference_loss, sample_with=draws)
        previous = None
        if self.previous:
            previous = load_previous(self.previous, rank, world, [p.ds_numel for p in self.params])
        self.start(
            self.engine,
            self.reference.micro_batches(0),
            loss_fn,
            self.engine.device,
            previous=previous,
            labels=str(self.labels),
        )

    def before_optimizer_step(self) -> float:
        return self.before_step()

    @property
    def ready(self) -> bool:
        return bool(self.fisher)

    def local_numel(self) -> int:
        return sum(f.numel() for f in self.fisher)

    def start(
        self,
        engine,
        batches: Iterable[Dict[str, torch.Tensor]],
        loss_fn: Callable,
        device,
        previous: Optional[Dict] = None,
        labels: str = "data",
    ) -> None:
        """Anchor at the current weights; estimate F on `batches` (this rank's reference micro-batches,
        the same count on every rank); merge an earlier stage's Fisher (online EWC)."""
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad

        self.anchor = [safe_get_local_fp32_param(p).detach().float().clone() for p in self.params]
        fisher = [torch.zeros_like(a) for a in self.anchor]
        n = 0
        for batch in batches:
            # Each reference batch is its own accumulation boundary: its gradient is reduced over
            # ranks and lands in the local partitions, where we square it; no optimizer step.
            engine.set_gradient_accumulation_boundary(True)
            loss = loss_fn(engine, batch, device)
            engine.backward(loss, scale_wrt_gas=False)
            for f, p in zip(fisher, self.params):
                g = safe_get_local_grad(p)
                if g is not None:
                    ewc_math.accumulate_fisher(f, g)
            engine.optimizer.zero_grad()
            n += 1
        engine._is_gradient_accumulation_boundary = None  # back to DeepSpeed's own micro-step counting
        if hasattr(engine.optimizer, "set_gradient_accumulation_boundary"):
            engine.optimizer.set_gradient_accumulation_boundary(False)
        for f in fisher:  # in place: a second list would hold a second copy of the Fisher at once
            f.div_(max(n, 1))
        if self.normalise:
            totals = torch.tensor(
                [sum(float(f.double().sum()) for f in fisher), sum(f.numel() for f in fisher)], dtype=torch.float64
            )
            distributed.all_reduce_sum(totals)
            ewc_math.normalise(fisher, float(totals[0]), int(totals[1]))
        if previous is not None:
            old = previous["fisher"]
            if [o.shape for o in old] != [f.shape for f in fisher]:
                raise ValueError(
                    "regularizer.ewc.previous: its Fisher shards do not match this model's local "
                    "partitions: it must come from a stage of the same model (any number of ranks)"
                )
            for f, o in zip(fisher, old):
                ewc_math.online_merge_(f, o, self.gamma)
        self.fisher = fisher
        log.info(
            "EWC: Fisher from %d reference batches (%s labels)%s; lambda %g; %.1f MB of EWC state on this rank",
            n,
            labels,
            " merged with the previous stage's" if previous is not None else "",
            self.lam,
            8 * self.local_numel() / 2**20,
        )

    def before_step(self) -> float:
        """Add λ·F⊙(θ−θ*) to each local gradient partition (call between the boundary backward and
        engine.step()); return this rank's part of the penalty λ/2·ΣF(θ−θ*)²."""
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad, safe_set_local_grad

        parts = []
        for p, a, f in zip(self.params, self.anchor, self.fisher):
            theta = safe_get_local_fp32_param(p).detach()
            part, extra = ewc_math.penalty_and_grad(theta, a, f, self.lam)
            parts.append(part)
            if self.lam == 0.0:
                continue
            g = safe_get_local_grad(p)
            safe_set_local_grad(p, extra.to(g.dtype) if g is None else g.add_(extra.to(g.dtype)))
        return float(torch.stack(parts).double().sum())  # one device -> host sync a step

    def state_dict(self) -> Dict:
        return {"anchor": self.anchor, "fisher": self.fisher}

    def load_state_dict(self, state: Dict) -> None:
        self.anchor = [t.float() for t in state["anchor"]]
        self.fisher = [t.float() for t in state["fisher"]]

    def load_resharded(self, states: List[Dict], world: int, rank: int) -> None:
        """The state saved by len(states) ranks (each its own partitions, in rank order), re-cut to this
        rank's partitions of `world`: the same Fisher and anchor element for element, so the penalty
        is unchanged. The Fisher is not normalised again (its mean over the old padding stays)."""
        from trainer.checkpointing.reshard import repartition

        numels = [p.ds_numel for p in self.params]
        for key in ("anchor", "fisher"):
            if any(len(s[key]) != len(numels) for s in states):
                raise ValueError(
                    f"EWC state: {len(states[0][key])} {key} partitions saved, this model has "
                    f"{len(numels)} trainable parameters (saved with another model?)"
                )
            setattr(
                self,
                key,
                [repartition([s[key][i] for s in states], n, world, rank).float() for i, n in enumerate(numels)],
            )


def load_previous(output_dir: str, rank: int, world: int = 1, numels: Optional[List[int]] = None) -> Dict:
    """The EWC state (Fisher) of this rank from an earlier stage's final checkpoint, for online EWC.
    Saved by another number of ranks (the stage ran on another allocation), it is re-cut for `rank`
    of `world` from every old rank's file (`numels`: this model's parameter sizes, in EWC order)."""
    ckpt = Path(output_dir) / "checkpoints"
    latest = ckpt / "latest"
    if not latest.is_file():
        raise FileNotFoundError(
            f"regularizer.ewc.previous={output_dir!r}: no checkpoints/latest there; point it at "
            "the output_dir of a finished earlier stage that ran with regularizer=ewc"
        )
    tag = ckpt / latest.read_text().strip()
    saved_by = len(list(tag.glob("ewc_rank*.pt")))
    if saved_by == 0:
        raise FileNotFoundError(
            f"regularizer.ewc.previous: no ewc_rank*.pt in {tag} (the earlier stage ran without EWC)"
        )
    if saved_by == world or numels is None:
        path = tag / f"ewc_rank{rank}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"regularizer.ewc.previous: {path} not found ({tag} was saved by {saved_by} ranks)")
        return torch.load(path, weights_only=True)
    from trainer.checkpointing.reshard import repartition

    states = [torch.load(tag / f"ewc_rank{r}.pt", weights_only=True, mmap=True) for r in range(saved_by)]
    if any(len(s["fisher"]) != len(numels) for s in states):
        raise ValueError(
            f"regularizer.ewc.previous: {tag}'s EWC state has {len(states[0]['fisher'])} partitions, this "
            f"model has {len(numels)} trainable parameters (another model?)"
        )
    log.info("EWC: the previous stage's Fisher (%s, %d ranks) re-cut for %d ranks", tag, saved_by, world)
    return {
        key: [repartition([s[key][i] for s in states], n, world, rank).float() for i, n in enumerate(numels)]
        for key in ("anchor", "fisher")
    }


def reference_loss(
    engine, batch: Dict[str, torch.Tensor], device: torch.device, sample_with: Optional[torch.Generator] = None
) -> torch.Tensor:
    """The mean token loss of one reference batch over all ranks, scaled for DeepSpeed's averaging
    (the Fisher is the squared gradient of exactly this loss); with `sample_with`, on targets drawn
    from the model's own predictions (regularizer.ewc.fisher_labels=sampled)."""
    count = torch.tensor([float(supervised_tokens(batch["labels"]))], dtype=torch.float64)
    distributed.all_reduce_sum(count)
    scale = backward_scale(int(count), distributed.world_size())
    if sample_with is None:
        return head.score(engine, batch, device, uniform=True).sum() * scale
    # Sampled labels are drawn from the model's full distribution: this pass keeps the full logits.
    out = engine(
        input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device), use_cache=False
    )
    return row_loss_sums(out.logits, sampled_labels(out.logits, batch["labels"], sample_with)).sum() * scale
