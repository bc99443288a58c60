"""The loop's extension points: what a stage plugs into trainer/loop.py without editing it.

- `Component`: an object the loop calls at fixed points of a run (OLMo-core's callbacks). EWC,
  evaluation, checkpointing, interpolation, the export, the log window and the end-of-run summary
  are components; the loop holds one list of them and calls each hook in list order:

      on_start(state, tracker)          once, after the resume, before the first step
      pre_step(state)                   before each step's batches are made
      before_optimizer_step() -> float  inside the step, at the accumulation boundary: after the
                                        last backward, before DeepSpeed clips and steps (a
                                        regulariser adds its gradient here; the float is this
                                        rank's part of its penalty, logged as reg/<name>_penalty)
      after_step(state, tracker, last)  after each step (log, evaluate, save: at their cadence)
      on_stop(state)                    a preemption or max_time stops the run after this step
      on_end(state, tracker)            after the last step (interpolate, export, summarise)

  Every hook is collective where its work is (every rank calls it at the same point).
- `BatchSource`: what makes a step's micro-batches. The data stage's is the rank-sharded packed
  loader (data_pipeline/loader.py); a stage that generates its batch from the current policy (online
  RL) or splits a row over ranks (sequence parallelism) supplies its own, and the loop is unchanged.
- `Objective` (trainer/objectives/__init__.py): what a step minimises.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Protocol, Sequence, Tuple

if TYPE_CHECKING:  # types only: this module imports nothing at run time
    import torch

    from trainer.checkpointing.checkpoint import TrainState
    from trainer.observability.tracking import Tracker


class Component:
    """A part of a run the loop calls at fixed points; every hook does nothing unless overridden."""

    name = ""
    """Names the component's metrics (reg/<name>_penalty)."""

    def on_start(self, state: TrainState, tracker: Tracker) -> None:
        pass

    def pre_step(self, state: TrainState) -> None:
        pass

    def before_optimizer_step(self) -> Optional[float]:
        return None

    def after_step(self, state: TrainState, tracker: Tracker, last: bool) -> None:
        pass

    def on_stop(self, state: TrainState) -> None:
        pass

    def on_end(self, state: TrainState, tracker: Tracker) -> None:
        pass


class BatchSource(Protocol):
    """The micro-batches of each step, on this rank."""

    rows_per_step: int
    """Rows one step trains on, over all ranks (for the log line)."""

    def micro_batches(self, step: int) -> List[Dict[str, torch.Tensor]]:
        """This rank's micro-batches of `step` (0-based): dicts of input_ids, labels, position_ids,
        source, row, real_tokens, filled, and what the objective reads."""

    def rows(self, step: int) -> Sequence[Sequence[Tuple[int, int]]]:
        """(source index, row) of each row of `step` on this rank, per micro-batch: how a failed step
        names its data."""
