"""The numbers of a training step, and what a logged line says about the steps since the last one.

Pure arithmetic (no torch, no collectives): `train_step` in trainer/loop.py hands over a
StepResult whose sums already cover every rank, and a MetricWindow turns the steps between two
log lines into one line that describes all of them, not just the last:

    losses and fractions   token-weighted over the window (sum of numerators / sum of denominators);
                           a DPO stage's loss and rewards/*, logps/* pair-weighted the same way
    counts                 summed (tokens), or the running totals the loop keeps (tokens_seen)
    learning rate          the last value
    gradient norm          the mean over the window's steps, and its max
    EWC penalty            the mean over the window's steps

Why it matters: with trainer.cadence.log_every_steps=5 and replay rows in one step of five, the old
"value of the logged step" showed data/replay_token_fraction = 0.0 at every line although replay
was a tenth of the tokens. Perf metrics (trainer/observability/perf.py) are window averages too, and peak memory
is the max.

A worked example: two steps, losses 30/10 tokens and 10/30 tokens. The window's loss is
(30 + 10) / (10 + 30) = 1.0, not the mean of 3.0 and 0.33.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple


@dataclass
class StepResult:
    """One optimizer step. Sums cover every rank; nonfinite_rows are this rank's."""

    loss_sum: float
    """Sum of the token losses of the step."""
    supervised_tokens: float
    """Tokens that carried a loss."""
    real_tokens: float
    """Non-padding tokens (what the step trained on)."""
    slots: float
    """Token positions in the step's rows (rows x width): the compute paid for."""
    source_loss_sum: List[float]
    """Per source (in the loader's order): sum of token losses."""
    source_supervised: List[float]
    """Per source: the loss's units (tokens that carried a loss; preference pairs in a DPO stage)."""
    source_tokens: List[float]
    """Per source: non-padding tokens."""
    lr: float
    """The learning rate the step used."""
    grad_norm: float
    """Global gradient norm before clipping (nan when DeepSpeed did not report one)."""
    penalties: Dict[str, float] = field(default_factory=dict)
    """Each regularising component's penalty at the step, summed over ranks (EWC's λ/2·ΣF(θ−θ*)²
    under "ewc"); logged as reg/<name>_penalty."""
    nonfinite_rows: List[Tuple[str, int, int]] = field(default_factory=list)
    """(source, row, micro-batch) of this rank's rows whose loss was not finite."""
    units: Optional[float] = None
    """What the loss is a mean over: None = supervised_tokens; a DPO stage's preference pairs."""
    stats: Dict[str, float] = field(default_factory=dict)
    """Sums over the step's units of the objective's own metrics (a DPO stage's rewards/*, logps/*)."""

    @property
    def loss_units(self) -> float:
        return self.supervised_tokens if self.units is None else self.units

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.loss_units, 1.0)

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss)


class MetricWindow:
    """Accumulates StepResults between two log lines; `summary()` describes them and starts anew."""

    def __init__(self, source_names: Sequence[str]) -> None:
        self.names = list(source_names)
        self._reset()

    def _reset(self) -> None:
        n = len(self.names)
        self.steps = 0
        self.loss_sum = self.supervised = self.units = self.real = self.slots = 0.0
        self.stats: Dict[str, float] = {}
        self.src_loss, self.src_supervised, self.src_tokens = [0.0] * n, [0.0] * n, [0.0] * n
        self.grad_norms: List[float] = []
        self.penalties: Dict[str, List[float]] = {}
        self.lr = float("nan")

    def add(self, r: StepResult) -> None:
        self.steps += 1
        self.loss_sum += r.loss_sum
        self.supervised += r.supervised_tokens
        self.units += r.loss_units
        for k, v in r.stats.items():
            self.stats[k] = self.stats.get(k, 0.0) + v
        self.real += r.real_tokens
        self.slots += r.slots
        for j in range(len(self.names)):
            self.src_loss[j] += r.source_loss_sum[j]
            self.src_supervised[j] += r.source_supervised[j]
            self.src_tokens[j] += r.source_tokens[j]
        self.grad_norms.append(r.grad_norm)
        for name, value in r.penalties.items():
            self.penalties.setdefault(name, []).append(value)
        self.lr = r.lr

    def summary(self) -> Dict[str, float]:
        """The window's metrics (train/loss, train/lr, train/grad_norm, data/*, reg/*), then reset."""
        if self.steps == 0:
            return {}
        out = {
            "train/loss": self.loss_sum / max(self.units, 1.0),
            "train/lr": self.lr,
            "train/grad_norm": sum(self.grad_norms) / len(self.grad_norms),
            "train/grad_norm_max": max(self.grad_norms, key=lambda g: g if g == g else math.inf),
            "data/packing_efficiency": self.real / max(self.slots, 1.0),
            "data/supervised_token_fraction": self.supervised / max(self.slots, 1.0),
        }
        if len(self.names) > 1:
            for j, name in enumerate(self.names):
                if self.src_supervised[j] > 0:
                    out[f"train/{name}/loss"] = self.src_loss[j] / self.src_supervised[j]
                out[f"data/{name}/token_fraction"] = self.src_tokens[j] / max(self.real, 1.0)
        out.update({k: v / max(self.units, 1.0) for k, v in self.stats.items()})  # rewards/*, logps/*: per pair
        if "replay" in self.names:
            out["data/replay_token_fraction"] = out.get("data/replay/token_fraction", 0.0)
        for name, values in self.penalties.items():
            out[f"reg/{name}_penalty"] = sum(values) / len(values)
        self._reset()
        return out
