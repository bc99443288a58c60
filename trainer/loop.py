"""The training loop. `fit(cfg)` trains one stage: `build(cfg)` (trainer/build.py) makes everything
the stage needs and resumes it; `Trainer.run()` is the loop, readable top to bottom.

Each step: the components' pre_step, the step's micro-batches from the stage's batch source, one
optimizer step (trainer/step.py; the components' boundary hooks inside it), the step's counters,
then each component's after_step (the log window, evaluation, checkpointing: each decides its own
cadence), then the preemption check. After the last step, each component's on_end (interpolation,
the export, the summary). The loop knows no component by name: a stage adds one to the list
trainer/build.py makes, or supplies another batch source, without editing this file.
"""

from __future__ import annotations

import enum
import logging

from data_pipeline.choices import OnNonFinite
from trainer import distributed
from trainer.build import Run, build, same_model
from trainer.checkpointing.checkpoint import finished_step
from trainer.config import Config
from trainer.observability.logs import setup_logging
from trainer.observability.tracking import Tracker
from trainer.step import check_finite, train_step

log = logging.getLogger("trainer")


class Outcome(enum.Enum):
    DONE = "done"
    """Trained to trainer.max_steps and exported."""
    ALREADY_DONE = "already done"
    """output_dir held a finished run: nothing to do."""
    STOPPED = "stopped"
    """A signal or trainer.max_time stopped the run after a checkpoint: rerun (or the requeue) resumes."""


def fit(cfg: Config) -> Outcome:
    """Train one stage. An output_dir that holds it finished is left as it is, before anything is
    built (a rerun of a finished job or recipe stage costs seconds, not a model build). Errors
    propagate as exceptions; the entry point turns them into exit status 1."""
    step = _finished_step(cfg)
    if step is not None and same_model(cfg):
        setup_logging(distributed.env_rank())
        log.info("%s is already complete at step %d; nothing to do", cfg.output_dir, step)
        return Outcome.ALREADY_DONE
    run = build(cfg)
    outcome = Trainer(run).run()
    run.close()
    distributed.shutdown()  # a recipe holds the group for its next stage (distributed.held)
    return outcome


def _finished_step(cfg: Config):
    """The one rule for "this output_dir holds the stage finished" (checkpointing/checkpoint.py):
    the step it finished at, or None."""
    return finished_step(cfg.output_dir, cfg.trainer.max_steps, cfg.trainer.export_hf)


class Trainer:
    """Trains a built Run (trainer/build.py) from its resumed step to trainer.max_steps."""

    def __init__(self, built: Run) -> None:
        self.built = built

    def run(self) -> Outcome:
        """Train, then return how the run ended: DONE, STOPPED (after a checkpoint; the preemption
        may requeue the job) or ALREADY_DONE. Collective."""
        r, cfg = self.built, self.built.cfg
        if _finished_step(cfg) is not None:  # resumed from a finished run of another model in this output_dir
            log.info("%s is already complete at step %d; nothing to do", cfg.output_dir, r.state.step)
            return Outcome.ALREADY_DONE
        tracker = Tracker(
            cfg.logger,
            cfg.output_dir,
            cfg.exp_name,
            r.config_tree,
            r.state.step,
            enabled=r.dist.is_main,
            job_type=str(cfg.stage.objective),
        )
        outcome = self._train(tracker)
        tracker.close()
        if outcome is Outcome.STOPPED:
            r.stop.finish(r.state.step, r.dist.rank, r.engine.device)  # says why; may requeue the job
        return outcome

    def _train(self, tracker: Tracker) -> Outcome:
        r = self.built
        t, state, components = r.cfg.trainer, r.state, r.components
        for c in components:
            c.on_start(state, tracker)
        first = True  # this process's first step checks that every parameter got a gradient
        while state.step < t.max_steps:
            self._step(check_grads=first)
            first = False
            last = state.step == t.max_steps
            for c in components:
                c.after_step(state, tracker, last)
            if not last and r.stop.requested(r.engine.device):  # every rank agrees to stop at this step
                for c in components:
                    c.on_stop(state)
                return Outcome.STOPPED
        for c in components:
            c.on_end(state, tracker)
        log.info("done: %d steps, outputs in %s", state.step, r.cfg.output_dir)
        return Outcome.DONE

    def _step(self, check_grads: bool) -> None:
        """One optimizer step and its bookkeeping: counters, the non-finite rule, perf, the log window."""
        r = self.built
        state, engine, t = r.state, r.engine, r.cfg.trainer
        for c in r.components:
            c.pre_step(state)
        r.perf.begin_step()
        with r.perf.phase("data_wait"):
            batches = r.batches.micro_batches(state.step)
        skipped_before = engine.skipped_steps
        result = train_step(
            engine,
            batches,
            r.objective,
            r.data.names,
            r.components,
            phase=r.perf.phase,
            check_grads=check_grads,
        )
        state.step += 1
        if engine.skipped_steps > skipped_before or not result.finite:
            state.skipped_steps += 1  # DeepSpeed found the gradient non-finite and did not update
            check_finite(
                state.step,
                state.skipped_steps,
                result,
                r.batches.rows(state.step - 1),
                r.data.names,
                skip=t.failure.on_nonfinite == OnNonFinite.skip,
                max_skipped_steps=t.failure.max_skipped_steps,
            )
        state.tokens_seen += int(result.real_tokens)
        state.supervised_tokens_seen += int(result.supervised_tokens)
        r.perf.end_step(
            state.step, result.real_tokens, {"train/loss": result.loss, "train/grad_norm": result.grad_norm}
        )
        r.window.add(result)
