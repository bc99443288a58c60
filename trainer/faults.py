"""Fault injection for the reliability tests: environment variables that make a real run fail in
one precise way at one precise point, which no outside timing could hit reliably.

    FULLFT_FAULT_KILL_IN_SAVE=STEP:RANK   that rank SIGKILLs itself inside the save at STEP, after
                                          its shards are written and before the save is COMPLETE
    FULLFT_FAULT_NAN_LOSS=STEP:RANK[,...] that rank's first micro-batch of STEP gets a NaN loss
    FULLFT_FAULT_KILL_IN_RESHARD=PHASE:RANK  that rank SIGKILLs itself while converting a checkpoint
                                          for another world size (trainer/checkpointing/reshard.py): PHASE
                                          `convert` (DeepSpeed's conversion written, no manifest yet)
                                          or `finalize` (the manifest written, not yet renamed)

STEP is the 1-based optimizer step. Unset (every normal run), each check is one dict lookup.
"""

from __future__ import annotations

import os
import signal
from typing import Set, Tuple

from trainer.components import Component

KILL_IN_SAVE = "FULLFT_FAULT_KILL_IN_SAVE"
NAN_LOSS = "FULLFT_FAULT_NAN_LOSS"
KILL_IN_RESHARD = "FULLFT_FAULT_KILL_IN_RESHARD"


def _points(name: str) -> Set[Tuple[int, int]]:
    value = os.environ.get(name, "").strip()
    if not value:
        return set()
    try:
        return {(int(s), int(r)) for s, r in (p.split(":") for p in value.split(","))}
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected STEP:RANK[,STEP:RANK...]") from None


def kill_in_save(step: int, rank: int) -> None:
    if (step, rank) in _points(KILL_IN_SAVE):
        os.kill(os.getpid(), signal.SIGKILL)


def inject(objective, rank: int):
    """(objective, components) for a run on `rank`: unchanged, with no component, unless
    FULLFT_FAULT_NAN_LOSS names this rank; then an objective whose first micro-batch of each named
    step has a NaN loss, and the component that arms it before those steps. The step itself never
    knows (trainer/step.py has no fault code)."""
    steps = {s for s, r in _points(NAN_LOSS) if r == rank}
    if not steps:
        return objective, []
    poisoned = NaNLoss(objective, steps)
    return poisoned, [poisoned]


class NaNLoss(Component):
    """The objective, but the first micro-batch of each step in `steps` (1-based) gets a NaN loss."""

    def __init__(self, objective, steps: Set[int]) -> None:
        self.objective, self.steps, self.armed = objective, steps, False

    def __getattr__(self, name: str):  # count, row_units, stats, uniform, ...: the objective's
        return getattr(self.objective, name)

    def pre_step(self, state) -> None:
        self.armed = state.step + 1 in self.steps

    def rows(self, nll, batch):
        rows, stats = self.objective.rows(nll, batch)
        if self.armed:
            self.armed = False  # the step's first micro-batch only
            rows = rows * float("nan")
        return rows, stats


def kill_in_reshard(phase: str, rank: int) -> None:
    value = os.environ.get(KILL_IN_RESHARD, "").strip()
    if value and value == f"{phase}:{rank}":
        os.kill(os.getpid(), signal.SIGKILL)
