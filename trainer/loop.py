"""The training loop. `Trainer(cfg)` builds everything a run needs; `Trainer.run()` is the loop.

Build, top to bottom: ranks -> tokenizer -> prepared data -> model under ZeRO-3 -> DeepSpeed
engine -> resume. Run: steps until trainer.max_steps; after each step, one call each to the
objects that decide their own cadence (the log window, evaluation, checkpointing, preemption);
at the end the Hugging Face export. `run()` returns an Outcome and never ends the process: the
entry point (launch/train.py) turns an early stop into exit status 0, which the Slurm requeue
contract relies on, and a recipe does not start its next stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Dict, List, Optional

import torch

from data_pipeline.loader import StepLoader
from data_pipeline.packing import IGNORE
from trainer import distributed, faults
from trainer.forgetting import interpolation
from trainer.objectives import head as loss_head
from trainer.checkpointing import preemption
from trainer.objectives import reference
from trainer.checkpointing import reshard
from trainer.checkpointing.checkpoint import Checkpointer, TrainState, export_hf, finished_step
from trainer.config import Config, FisherLabels, Objective, OffloadDevice, OnNonFinite
from trainer.data import prepare_data
from trainer.engine.deepspeed_config import build_deepspeed_config
from trainer.evaluate import Evaluation
from trainer.observability.generation import Generator
from trainer.objectives.token import TokenLoss, backward_scale, row_loss_sums, sampled_labels, supervised_tokens
from trainer.observability.metrics import MetricWindow, StepResult
from trainer.engine.model import build_model, count_parameters, model_config
from trainer.engine.optim import build_optimizer
from trainer.observability.perf import PerfMeter
from trainer.objectives.preference import PreferenceLoss
from trainer.observability.redaction import redact
from trainer.forgetting.ewc import EWC, load_previous
from trainer.engine.tokenizer import load_tokenizer
from trainer.observability.tracking import Progress, Tracker, summarise

log = logging.getLogger("trainer")


class Outcome(enum.Enum):
    DONE = "done"
    """Trained to trainer.max_steps and exported."""
    ALREADY_DONE = "already done"
    """output_dir held a finished run: nothing to do."""
    STOPPED = "stopped"
    """A signal or trainer.max_time stopped the run after a checkpoint: rerun (or the requeue) resumes."""


def fit(cfg: Config) -> Outcome:
    """Train one stage; an output_dir that holds it finished is left as it is, before anything is built
    (a rerun of a finished job or recipe stage costs seconds, not a model build)."""
    step = finished_step(cfg.output_dir, cfg.trainer.max_steps, cfg.trainer.export_hf)
    if step is not None and _same_model(cfg):
        distributed.setup_logging(distributed.env_rank())
        log.info("%s is already complete at step %d; nothing to do", cfg.output_dir, step)
        return Outcome.ALREADY_DONE
    return Trainer(cfg).run()


class Trainer:
    """One stage of training. Construction does every piece of setup, in the order a failure should
    surface (config checks and tokenizer in seconds, then data, then the model and the engine, then
    the resume); `run()` trains."""

    def __init__(self, cfg: Config) -> None:
        t = cfg.trainer
        self.stop = preemption.install(t.max_time)  # USR1/TERM/max_time: a flag the loop checks each step
        self.dist = dist = distributed.init(t.dist_timeout_s)
        distributed.setup_logging(dist.rank)
        # grad_accum_steps as set, or derived: from trainer.global_batch_size, or on a resume what keeps
        # the checkpoint's global batch on this world size (read from files: seconds).
        self.cfg = cfg = _resolve_batch(cfg, dist.world_size)
        t = cfg.trainer
        self.config_tree = redact(dataclasses.asdict(cfg))
        _announce_config(self.config_tree, cfg.output_dir, dist)
        _seed_everything(t.seed)

        # One process per node trains the tokenizer (if any) before the others load it.
        with distributed.local_rank_zero_first():
            self.tokenizer = load_tokenizer(cfg.model)
        # Everything that can be checked without data or weights fails here, in seconds.
        hf_config = model_config(cfg.model, self.tokenizer, cfg.data.seq_len, packed=cfg.data.packing)
        interpolation.check(cfg, baseline_expected=cfg.eval.at_start)
        ds_config = build_deepspeed_config(cfg.deepspeed, t, dist.world_size, dist.on_gpu)
        # Prepared once per cache (the node's first process prepares, the others wait on the filesystem).
        self.data = prepare_data(cfg, self.tokenizer, preparer=dist.local_rank == 0, progress=dist.is_main)
        self.pad = None if cfg.data.packing else cfg.data.pad_to_multiple_of  # unpacked rows: to the longest

        # The model, partitioned at construction, and the engine around it.
        import deepspeed

        distributed.import_muon_uncompiled()  # 2.2 s a rank of torch.compile for an optimizer never used
        model = build_model(cfg.model, hf_config, t, ds_config, self.tokenizer)
        optimizer, scheduler = build_optimizer(model, t, cpu_offload=cfg.deepspeed.offload_optimizer != OffloadDevice.none)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=ds_config)
        self.device = self.engine.device
        # What the stage minimises: the token loss, or (stage=dpo) a preference loss whose reference
        # log-probs the starting weights compute now, once, before a resume replaces them.
        self.objective = TokenLoss()
        if cfg.stage.objective == Objective.dpo:
            s = cfg.stage
            self.objective = PreferenceLoss(s.loss, s.beta, s.label_smoothing, s.simpo_gamma)
            if self.objective.needs_reference:
                key = reference.start_key(cfg.model, t.seed, "bf16" if ds_config["bf16"]["enabled"] else "fp32",
                                          self.tokenizer)
                named = {**dict(zip(self.data.names, self.data.sources)),
                         **{f"eval/{n}": s for n, s in self.data.eval_sets.items()}}
                reference.attach(self.engine, named, key, cfg.eval.micro_batch_size, dist.rank, dist.world_size,
                                 self.device, writer=dist.local_rank == 0)
        e = cfg.regularizer.ewc
        self.ewc = EWC(self.engine, e.lam, e.gamma, e.normalise) if cfg.regularizer.uses_ewc else None
        self.checkpointer = Checkpointer(cfg.output_dir, t.keep_last, dist.rank, dist.world_size,
                                         fallback=t.resume_fallback, tokenizer=self.tokenizer,
                                         extras={"ewc": self.ewc} if self.ewc else None, every_steps=t.save_every_steps,
                                         elastic=t.elastic_resume)
        # Restores EWC's Fisher and anchor too; a checkpoint of another world size is resharded.
        self.state = self.checkpointer.resume(self.engine)
        _continue_data(self.state, t, dist.world_size)
        if self.state.step > 0 and cfg.model.name_or_path:
            log.warning("resuming at step %d: the weights come from the checkpoint, not from model.name_or_path=%s "
                        "(which only started step 0); use a new output_dir to start again from %s",
                        self.state.step, cfg.model.name_or_path, cfg.model.name_or_path)

        self.loader = StepLoader(self.data.sources, self.data.weights, t.micro_batch_size, t.grad_accum_steps,
                                 dist.rank, dist.world_size, t.seed, pad_to_multiple_of=self.pad,
                                 origin=tuple(self.state.data_origin))
        generator = Generator(cfg.eval.sample_prompts, cfg.eval.sample_max_new_tokens, self.tokenizer,
                              chat=cfg.stage.objective != Objective.pretrain, system_prompt=cfg.stage.system_prompt)
        self.evaluation = Evaluation(self.engine, self.data.eval_sets, cfg.eval.micro_batch_size, t.eval_every_steps,
                                     cfg.eval.at_start, cfg.eval.baseline_from, generator, dist.rank, dist.world_size,
                                     self.device, self.pad,
                                     self.objective if isinstance(self.objective, PreferenceLoss) else None)
        self.perf = PerfMeter.for_model(self.engine.module, cfg.data.seq_len, dist.world_size, dist.rank, dist.on_gpu,
                                        bf16=ds_config["bf16"]["enabled"])
        self.window = MetricWindow(self.data.names)

    @property
    def finished(self) -> bool:
        """output_dir holds this run finished: every step trained and, if asked for, the export written."""
        hf = Path(self.cfg.output_dir) / "hf" / "config.json"
        return self.state.step >= self.cfg.trainer.max_steps and (not self.cfg.trainer.export_hf or hf.is_file())

    def run(self) -> Outcome:
        """Train from the resumed step to trainer.max_steps. Collective; the one exit of a run."""
        if self.finished:
            log.info("%s is already complete at step %d; nothing to do", self.cfg.output_dir, self.state.step)
            outcome = Outcome.ALREADY_DONE
        else:
            tracker = Tracker(self.cfg.logger, self.cfg.output_dir, self.cfg.exp_name, self.config_tree,
                              self.state.step, enabled=self.dist.is_main, job_type=str(self.cfg.stage.objective))
            outcome = self._train(tracker)
            tracker.close()
            if outcome is Outcome.STOPPED:
                self.stop.finish(self.state.step, self.dist.rank, self.device)  # says why; may requeue the job
        distributed.shutdown()
        return outcome

    def _train(self, tracker: Tracker) -> Outcome:
        t, state, engine = self.cfg.trainer, self.state, self.engine
        self._start_ewc()
        progress = Progress(state.step, t.max_steps, enabled=self.dist.is_main)
        log.info("%s parameters | world %d | %d rows x %d tokens | %d rows per step | steps %d -> %d",
                 f"{count_parameters(engine.module):,}", self.dist.world_size,
                 sum(len(s) for s in self.data.sources), self.cfg.data.seq_len, self.loader.rows_per_step,
                 state.step, t.max_steps)
        self.evaluation.start(state, tracker)
        first = True
        while state.step < t.max_steps:
            self._step(check_grads=first)
            first = False
            progress.update(state.step)
            last = state.step == t.max_steps
            self._log(tracker, progress, last)
            self.evaluation.maybe(state, tracker, last)
            self.checkpointer.maybe_save(engine, state, last)
            if not last and self.stop.requested(self.device):  # every rank agrees to stop at this step
                self.checkpointer.save_if_unsaved(engine, state)
                return Outcome.STOPPED
        if t.export_hf:
            chosen = self._interpolate(tracker) if self.cfg.regularizer.interpolation.enabled else None
            export_hf(engine, self.tokenizer, str(Path(self.cfg.output_dir) / "hf"), self.dist.rank)
            if chosen is not None and self.dist.is_main:
                (Path(self.cfg.output_dir) / "hf" / "interpolation.json").write_text(json.dumps(chosen, indent=2))
        progress.close()
        if self.dist.is_main:
            summarise(self.cfg.output_dir, state.baseline, dashboard=self.cfg.logger.dashboard)
        log.info("done: %d steps, outputs in %s", state.step, self.cfg.output_dir)
        return Outcome.DONE

    def _step(self, check_grads: bool) -> None:
        """One optimizer step and its bookkeeping: counters, the non-finite rule, perf, the log window."""
        state, perf = self.state, self.perf
        perf.begin_step()
        with perf.phase("data_wait"):
            batches = self.loader.micro_batches(state.step)
        skipped_before = self.engine.skipped_steps
        result = train_step(self.engine, batches, self.dist.world_size, self.device, check_grads=check_grads,
                            source_names=self.data.names, objective=self.objective, phase=perf.phase, ewc=self.ewc,
                            poison=faults.nan_loss(state.step + 1, self.dist.rank))
        state.step += 1
        if self.engine.skipped_steps > skipped_before or not result.finite:
            state.skipped_steps += 1  # DeepSpeed found the gradient non-finite and did not update
            _nonfinite(state, result, self.loader.rows(state.step - 1), self.data.names, self.cfg.trainer)
        state.tokens_seen += int(result.real_tokens)
        state.supervised_tokens_seen += int(result.supervised_tokens)
        perf.end_step(state.step, result.real_tokens, {"train/loss": result.loss, "train/grad_norm": result.grad_norm})
        self.window.add(result)

    def _log(self, tracker: Tracker, progress: Progress, last: bool) -> None:
        """Every trainer.log_every_steps steps (and at the last): one line that describes the steps
        since the previous line (trainer/observability/metrics.py). Collective: perf gathers every rank's memory."""
        state = self.state
        if state.step % self.cfg.trainer.log_every_steps and not last:
            return
        metrics = {**self.window.summary(), "train/skipped_steps": state.skipped_steps,
                   "train/tokens_seen": state.tokens_seen, "train/supervised_tokens_seen": state.supervised_tokens_seen,
                   **self.perf.metrics()}
        tracker.log(state.step, metrics)
        progress.log(state.step, metrics)  # one line per log step (and the bar on a terminal)

    def _interpolate(self, tracker: Tracker) -> Dict:
        """After the last step: score θ0 + α(θ − θ0) for the configured α, leave the weights at the
        chosen one for the export (trainer/forgetting/interpolation.py). The checkpoint keeps θ."""
        result = interpolation.sweep(self.engine, self.cfg, self.state.baseline, self.evaluation.scores, self.dist.rank)
        metrics = {f"interpolation/{r['alpha']:g}/{k}": v for r in result["rows"] for k, v in r.items() if k != "alpha"}
        if all(c in "0123456789." for c in result["alpha"]):
            metrics["interpolation/alpha"] = float(result["alpha"])
        tracker.log(self.state.step, metrics)
        if self.dist.is_main:
            (Path(self.cfg.output_dir) / "interpolation.json").write_text(json.dumps(result, indent=2))
        return result

    def _start_ewc(self) -> None:
        """A fresh stage with EWC: anchor at the current weights, Fisher on the reference data (a
        resumed one has both from its checkpoint)."""
        if self.ewc is None or self.ewc.ready:
            return
        t, e = self.cfg.trainer, self.cfg.regularizer.ewc
        reference = StepLoader([self.data.fisher], [1.0], t.micro_batch_size, e.fisher_batches, self.dist.rank,
                               self.dist.world_size, t.seed, pad_to_multiple_of=self.pad)
        loss_fn = _reference_loss
        if e.fisher_labels == FisherLabels.sampled:  # the model's own predictions as targets, seeded per rank
            draws = torch.Generator(device=self.device).manual_seed(t.seed * 1_000_003 + self.dist.rank)
            loss_fn = functools.partial(_reference_loss, sample_with=draws)
        self.ewc.start(self.engine, reference.micro_batches(0), loss_fn, self.device,
                       previous=load_previous(e.previous, self.dist.rank, self.dist.world_size,
                                              [p.ds_numel for p in self.ewc.params]) if e.previous else None,
                       labels=str(e.fisher_labels))


def train_step(engine, micro_batches: List[Dict[str, torch.Tensor]], world_size: int, device: torch.device,
               check_grads: bool, source_names: List[str], objective=None,
               phase=contextlib.nullcontext, ewc: Optional[EWC] = None, poison: bool = False) -> StepResult:
    """One optimizer step over this rank's micro-batches; the loss is the mean over every unit of the
    step on all ranks: supervised tokens (TokenLoss, trainer/objectives/token.py) or preference pairs
    (PreferenceLoss, trainer/objectives/preference.py). `phase(name)` is a context manager timing a part of the
    step (PerfMeter.phase). `poison`: fault injection, a NaN loss in the first micro-batch (trainer/faults.py)."""
    objective = objective or TokenLoss()
    counts = torch.tensor([[objective.count(b), supervised_tokens(b["labels"]), int(b["real_tokens"]),
                            b["labels"].numel()] for b in micro_batches], dtype=torch.float64).sum(0)
    distributed.all_reduce_sum(counts)
    scale = backward_scale(int(counts[0]), world_size)
    lr = engine.get_lr()[0]
    # Per source, columns [loss sum, loss units, real tokens]; the last row is the EWC penalty; then
    # the objective's metric sums (a preference stage's rewards and log-probs).
    sums = torch.zeros(len(source_names) + 1, 3, dtype=torch.float64)
    stat_sums = torch.zeros(len(objective.stats), dtype=torch.float64)
    nonfinite_rows = []
    for m, batch in enumerate(micro_batches):
        with phase("forward_backward"):
            rows, row_stats = objective.rows(loss_head.score(engine, batch, device, objective.uniform), batch)
            if poison and m == 0:
                rows = rows * torch.tensor(float("nan"), device=rows.device)
            engine.backward(rows.sum() * scale, scale_wrt_gas=False)
        if check_grads and engine.is_gradient_accumulation_boundary():
            _check_every_parameter_has_a_gradient(engine)
        if ewc is not None and engine.is_gradient_accumulation_boundary():
            sums[-1, 0] = ewc.before_step()  # EWC's gradient joins the loss's, before clipping
        with phase("optimizer"):
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        row_sums = rows.detach().double().cpu()  # the step's one device -> host copy of the losses
        if row_stats is not None:
            stat_sums += row_stats.detach().double().sum(0).cpu()
        bad = ~torch.isfinite(row_sums)
        if bad.any():
            nonfinite_rows += [(source_names[int(batch["source"][i])], int(batch["row"][i]), m)
                               for i in bad.nonzero().flatten().tolist()]
        source = batch["source"]
        sums[:-1, 0].index_add_(0, source, row_sums)
        sums[:-1, 1].index_add_(0, source, objective.row_units(batch))
        sums[:-1, 2].index_add_(0, source, batch["filled"].double())
    flat = torch.cat([sums.flatten(), stat_sums])
    distributed.all_reduce_sum(flat)  # one collective for every source's sums, the penalty and the metrics
    sums, stat_sums = flat[:sums.numel()].view_as(sums), flat[sums.numel():]
    grad_norm = engine.get_global_grad_norm()
    per_source = sums[:-1].tolist()
    return StepResult(loss_sum=float(sums[:-1, 0].sum()), supervised_tokens=float(counts[1]),
                      real_tokens=float(counts[2]), slots=float(counts[3]),
                      source_loss_sum=[r[0] for r in per_source], source_supervised=[r[1] for r in per_source],
                      source_tokens=[r[2] for r in per_source], lr=lr,
                      grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                      ewc_penalty=float(sums[-1, 0]) if ewc is not None else None, nonfinite_rows=nonfinite_rows,
                      units=float(counts[0]), stats=dict(zip(objective.stats, stat_sums.tolist())))


def _nonfinite(state: TrainState, result: StepResult, step_rows: List, names: List[str], t) -> None:
    """A step with a NaN/inf loss or gradient: DeepSpeed has already dropped its update (the
    weights are as before the step). Name the step and the rows, then stop or, with
    trainer.on_nonfinite=skip, go on within trainer.max_skipped_steps. Called on every rank (the
    loss and DeepSpeed's overflow flag are reduced over ranks), so all ranks decide alike."""
    ranks = distributed.all_gather_object((result.nonfinite_rows, step_rows))
    culprits = [f"{src}:row {row} (rank {r}, micro-batch {m})" for r, (rows, _) in enumerate(ranks)
                for src, row, m in rows]
    if culprits:
        where = f"rows with a non-finite loss: {', '.join(culprits[:20])}{' ...' if len(culprits) > 20 else ''}"
    else:  # the loss was finite everywhere: the gradient overflowed; name the whole step
        rows = [f"{names[src]}:row {row}" for _, per_micro in ranks for micro in per_micro for src, row in micro]
        where = (f"every row's loss was finite (the gradient overflowed); the step's rows: {', '.join(rows[:40])}"
                 f"{' ...' if len(rows) > 40 else ''}")
    what = (f"non-finite loss/gradient at step {state.step} (loss={result.loss}, grad_norm="
            f"{result.grad_norm}): {where}. The update was skipped; the weights are those of step "
            f"{state.step - 1}.")
    if t.on_nonfinite == OnNonFinite.skip and state.skipped_steps <= t.max_skipped_steps:
        log.warning("%s Skipped (%d of at most trainer.max_skipped_steps=%d).", what, state.skipped_steps,
                    t.max_skipped_steps)
        return
    if t.on_nonfinite == OnNonFinite.skip:
        advice = (f"{state.skipped_steps} steps skipped, more than trainer.max_skipped_steps={t.max_skipped_steps}: "
                  "the run is diverging or the data is bad.")
    else:
        advice = "trainer.on_nonfinite=skip would skip such steps (counted in train/skipped_steps)."
    raise RuntimeError(f"{what} Stopped, without saving: the last checkpoint is intact. Inspect those rows "
                       f"(data_pipeline: source name and row of the prepared cache) or lower trainer.lr; {advice}")


def _reference_loss(engine, batch: Dict[str, torch.Tensor], device: torch.device,
                    sample_with: Optional[torch.Generator] = None) -> torch.Tensor:
    """The mean token loss of one reference batch over all ranks, scaled for DeepSpeed's averaging
    (for EWC's Fisher: the squared gradient of exactly this loss); with `sample_with`, on targets
    drawn from the model's own predictions (regularizer.ewc.fisher_labels=sampled)."""
    count = torch.tensor([float(supervised_tokens(batch["labels"]))], dtype=torch.float64)
    distributed.all_reduce_sum(count)
    scale = backward_scale(int(count), distributed.world_size())
    if sample_with is None:
        return loss_head.score(engine, batch, device, uniform=True).sum() * scale
    # Sampled labels are drawn from the model's full distribution: this pass keeps the full logits.
    out = engine(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                 use_cache=False)
    return row_loss_sums(out.logits, sampled_labels(out.logits, batch["labels"], sample_with)).sum() * scale


def _check_every_parameter_has_a_gradient(engine) -> None:
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
        raise RuntimeError(f"{len(missing)} trainable parameters received no gradient in the first step: "
                           f"{missing[:10]}{' ...' if len(missing) > 10 else ''}. Check activation checkpointing "
                           "(trainer.activation_checkpointing) and the model code.")


def _announce_config(config_tree: dict, output_dir: str, dist) -> None:
    """Every rank logs the config hash (equal hashes = every rank runs the same config); rank 0 writes
    the resolved, redacted config to output_dir/config.yaml."""
    from omegaconf import OmegaConf

    digest = hashlib.sha256(json.dumps(config_tree, sort_keys=True, default=str).encode()).hexdigest()[:12]
    logging.getLogger("trainer.ranks").info("rank %d/%d config hash %s", dist.rank, dist.world_size, digest)
    if dist.is_main:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config_tree)))


MODEL_IDENTITY = ("name_or_path", "model_type", "arch", "tokenizer_path")


def _same_model(cfg: Config) -> bool:
    """output_dir/config.yaml (the last start's) names the model this run asks for. A finished run of
    another model in the same output_dir is not this run's, so it is not skipped."""
    from omegaconf import OmegaConf

    try:
        saved = OmegaConf.to_container(OmegaConf.load(Path(cfg.output_dir) / "config.yaml"))["model"]
    except (OSError, KeyError, TypeError, ValueError):
        return False
    ours = dataclasses.asdict(cfg.model)
    return all(saved.get(k) == ours.get(k) for k in MODEL_IDENTITY)


def _resolve_batch(cfg: Config, world: int) -> Config:
    """cfg with trainer.grad_accum_steps settled for `world` ranks: as set, from
    trainer.global_batch_size, or (resuming) what keeps the checkpoint's global batch."""
    t = cfg.trainer
    saved = reshard.saved_layout(cfg.output_dir)
    accum = reshard.resolve_batch(t.micro_batch_size, t.grad_accum_steps, t.global_batch_size, world, saved,
                                  t.allow_new_global_batch, t.elastic_resume)
    if saved is not None and saved.world_size != world and t.elastic_resume:
        log.info("resuming a checkpoint of %s on %d ranks: micro %d x accumulation %d x %d ranks = %d rows a step",
                 saved.describe(), world, t.micro_batch_size, accum, world, t.micro_batch_size * accum * world)
    return dataclasses.replace(cfg, trainer=dataclasses.replace(t, grad_accum_steps=accum))


def _continue_data(state: TrainState, t, world: int) -> None:
    """Record this run's layout in the state (saved with each checkpoint); when a resume accepted a
    new global batch (trainer.allow_new_global_batch), move the data origin to the row where the
    checkpoint stopped, so no row is skipped or seen twice."""
    saved, batch = state.layout(), t.micro_batch_size * t.grad_accum_steps * world
    if saved is not None and saved.global_batch != batch:
        if not t.allow_new_global_batch:  # the checkpoint resumed is not the one `latest` named (fallback)
            raise reshard.ReshardError(
                f"the checkpoint resumed (step {state.step}) was trained with {saved.describe()}, this run has "
                f"{batch} rows a step; set trainer.grad_accum_steps so that they agree, or "
                "trainer.allow_new_global_batch=true")
        origin_step, origin_row = state.data_origin
        row = origin_row + (state.step - origin_step) * saved.global_batch
        state.data_origin = [state.step, row]
        log.warning("global batch %d -> %d rows from step %d on (trainer.allow_new_global_batch): the data goes on from "
                    "row %d; the learning-rate schedule stays in steps, so the remaining %d steps train on %+.0f%% "
                    "rows each", saved.global_batch, batch, state.step, row, max(t.max_steps - state.step, 0),
                    100 * (batch / saved.global_batch - 1))
    state.world_size, state.micro_batch_size, state.grad_accum_steps = world, t.micro_batch_size, t.grad_accum_steps


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)

