"""The training loop: build everything, then `fit` runs steps until trainer.max_steps.

Read top to bottom: set up ranks -> data -> model under ZeRO-3 -> DeepSpeed engine -> resume ->
steps (log, eval, save) -> final save and Hugging Face export. Checkpointing, evaluation and
tracking are objects the loop calls at one point each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import random
from pathlib import Path
from typing import Dict, List, Optional

import torch

from data_pipeline.loader import StepLoader
from trainer import distributed, faults, preemption
from trainer.checkpoint import Checkpointer, TrainState, export_hf
from trainer.config import Config, redact
from trainer.data import prepare_data
from trainer.deepspeed_config import build_deepspeed_config
from trainer.evaluate import evaluate, forgetting_metrics
from trainer.loss import IGNORE, backward_scale, row_loss_sums, supervised_tokens
from trainer.model import build_model, count_parameters, model_config
from trainer.optim import build_optimizer
from trainer.regularizers.ewc import EWC, load_previous
from trainer.tokenizer import load_tokenizer
from trainer.perf import PerfMeter
from trainer.samples import SampleGenerator
from trainer.tracking import Progress, Tracker

log = logging.getLogger("trainer")


def fit(cfg: Config) -> None:
    stop = preemption.install(cfg.trainer.max_time)  # USR1/TERM/max_time: save and leave (in the step loop)
    dist = distributed.init(cfg.trainer.dist_timeout_s)
    distributed.setup_logging(dist.rank)
    t = cfg.trainer
    config_tree = redact(dataclasses.asdict(cfg))
    _announce_config(config_tree, cfg.output_dir, dist)
    _seed_everything(t.seed)

    # Data. One process per node trains the tokenizer (if any) before the others load it.
    if dist.local_rank == 0:
        tokenizer = load_tokenizer(cfg.model)
    distributed.barrier()
    if dist.local_rank != 0:
        tokenizer = load_tokenizer(cfg.model)
    # Everything that can be checked without data or weights fails here, in seconds.
    hf_config = model_config(cfg.model, tokenizer, cfg.data.seq_len, packed=cfg.data.packing)
    ds_config = build_deepspeed_config(cfg.deepspeed, t, dist.world_size, dist.on_gpu)
    # Prepared once per cache (the node's first process prepares, the others wait on the filesystem).
    data = prepare_data(cfg, tokenizer, preparer=dist.local_rank == 0, progress=dist.is_main)
    eval_sets = data.eval_sets

    # Model, partitioned at construction, and the engine around it.
    import deepspeed

    model = build_model(cfg.model, hf_config, t, ds_config, tokenizer)
    optimizer, scheduler = build_optimizer(model, t, cpu_offload=cfg.deepspeed.offload_optimizer != "none")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    device = engine.device

    ewc = EWC(engine, **_ewc_args(cfg)) if cfg.regularizer.uses_ewc else None
    checkpointer = Checkpointer(cfg.output_dir, t.keep_last, dist.rank, dist.world_size, fallback=t.resume_fallback,
                                tokenizer=tokenizer, extras={"ewc": ewc} if ewc else None)
    state = checkpointer.resume(engine)  # restores EWC's Fisher and anchor too
    if state.step > 0 and cfg.model.name_or_path:
        log.warning("resuming at step %d: the weights come from the checkpoint, not from model.name_or_path=%s "
                    "(which only started step 0); use a new output_dir to start again from %s",
                    state.step, cfg.model.name_or_path, cfg.model.name_or_path)
    if state.step >= t.max_steps and (not t.export_hf or (Path(cfg.output_dir) / "hf" / "config.json").is_file()):
        log.info("%s is already complete at step %d; nothing to do", cfg.output_dir, state.step)
        distributed.shutdown()
        return
    pad = None if cfg.data.packing else cfg.data.pad_to_multiple_of  # unpacked rows: pad to the longest
    if ewc is not None and not ewc.ready:  # a fresh stage: anchor here, Fisher on the reference data
        reference = StepLoader([data.fisher], [1.0], t.micro_batch_size, cfg.regularizer.ewc.fisher_batches,
                               dist.rank, dist.world_size, t.seed, pad_to_multiple_of=pad)
        previous = cfg.regularizer.ewc.previous
        ewc.start(engine, reference.micro_batches(0), _reference_loss, device,
                  previous=load_previous(previous, dist.rank) if previous else None)
    tracker = Tracker(cfg.logger, cfg.output_dir, cfg.exp_name, config_tree, state.step, enabled=dist.is_main,
                      job_type=cfg.stage.name)
    perf = PerfMeter.for_model(engine.module, cfg.data.seq_len, dist.world_size, dist.rank, dist.on_gpu,
                               bf16=ds_config["bf16"]["enabled"])
    samples = SampleGenerator(cfg.eval.sample_prompts, cfg.eval.sample_max_new_tokens, tokenizer,
                              chat=cfg.stage.name != "pretrain", system_prompt=cfg.stage.system_prompt)
    progress = Progress(state.step, t.max_steps, enabled=dist.is_main)
    loader = StepLoader(data.sources, data.weights, t.micro_batch_size, t.grad_accum_steps, dist.rank,
                        dist.world_size, t.seed, pad_to_multiple_of=pad)
    log.info("%s parameters | world %d | %d rows x %d tokens | %d rows per step | steps %d -> %d",
             f"{count_parameters(engine.module):,}", dist.world_size, sum(len(s) for s in data.sources),
             cfg.data.seq_len, loader.rows_per_step, state.step, t.max_steps)

    if state.step == 0 and eval_sets and cfg.eval.at_start:
        scores = evaluate(engine, eval_sets, cfg.eval.micro_batch_size, dist.rank, dist.world_size, device, pad)
        # The base model is the reference for eval/forgetting and eval/domain_gain; in a recipe,
        # forgetting is measured against the first stage's base model.
        state.baseline = {**scores, **_general_baseline(cfg.eval.baseline_from)}
        tracker.log(0, scores)
        tracker.log_samples(0, samples.generate(engine))
        log.info("eval of the base model: %s", {k: round(v, 4) for k, v in scores.items()})
    first_step = True
    while state.step < t.max_steps:
        perf.begin_step()
        with perf.phase("data_wait"):
            batches = loader.micro_batches(state.step)
        skipped_before = engine.skipped_steps
        metrics = train_step(engine, batches, dist.world_size, device,
                             check_grads=first_step, phase=perf.phase, source_names=data.names, ewc=ewc,
                             poison=faults.nan_loss(state.step + 1, dist.rank))
        first_step = False
        state.step += 1
        bad_rows = metrics.pop("nonfinite_rows")
        if engine.skipped_steps > skipped_before or not math.isfinite(metrics["train/loss"]):
            state.skipped_steps += 1  # DeepSpeed found the gradient non-finite and did not update
            _nonfinite(state, metrics, bad_rows, loader.rows(state.step - 1), data.names, t)
        metrics["train/skipped_steps"] = state.skipped_steps
        state.tokens_seen += int(metrics.pop("tokens"))
        state.supervised_tokens_seen += int(metrics.pop("supervised_tokens"))
        perf.end_step(state.step, metrics.pop("step_tokens"), metrics)
        progress.update(state.step)
        last = state.step == t.max_steps
        if state.step % t.log_every_steps == 0 or last:
            metrics.update({"train/tokens_seen": state.tokens_seen,
                            "train/supervised_tokens_seen": state.supervised_tokens_seen, **perf.metrics()})
            tracker.log(state.step, metrics)
            progress.log(state.step, metrics)  # one line per log step (and the bar on a terminal)
        if eval_sets and ((t.eval_every_steps and state.step % t.eval_every_steps == 0) or last):
            scores = evaluate(engine, eval_sets, cfg.eval.micro_batch_size, dist.rank, dist.world_size, device, pad)
            scores.update(forgetting_metrics(scores, state.baseline))
            tracker.log(state.step, scores)
            tracker.log_samples(state.step, samples.generate(engine))
            log.info("eval at step %d: %s", state.step, {k: round(v, 4) for k, v in scores.items()})
        if (t.save_every_steps and state.step % t.save_every_steps == 0) or last:
            checkpointer.save(engine, state)
        if not last and stop.requested(device):  # every rank agrees to stop at this step
            if not (t.save_every_steps and state.step % t.save_every_steps == 0):
                checkpointer.save(engine, state)
            tracker.close()
            stop.finish(state.step, dist.rank, device)  # says why; requeues a Slurm job when asked
            distributed.shutdown()
            raise SystemExit(0)  # an orderly stop, but the run is not over: no export, no next recipe stage

    if t.export_hf:
        export_hf(engine, tokenizer, str(Path(cfg.output_dir) / "hf"), dist.rank)
    progress.close()
    tracker.close()
    if dist.is_main:
        _summarise(cfg.output_dir, state.baseline)
    log.info("done: %d steps, outputs in %s", state.step, cfg.output_dir)
    distributed.shutdown()


def _summarise(output_dir: str, baseline: Dict[str, float]) -> None:
    """The run's forgetting summary (first vs last eval of each set) in the log, and the PNG
    dashboard (loss, eval, forgetting, throughput...) in output_dir, with or without W&B."""
    from launch.plot import load, render

    rows = load(Path(output_dir) / "metrics.jsonl")
    last = {k: v for r in rows for k, v in r.items() if k.startswith("eval/")}
    for key in sorted(k for k in last if k.endswith("/loss")):
        if key in baseline:
            log.info("summary %s: %.4f at the start -> %.4f at the end (%+.4f)", key, baseline[key], last[key],
                     last[key] - baseline[key])
    for key in ("eval/forgetting", "eval/domain_gain"):
        if key in last:
            log.info("summary %s: %+.4f", key, last[key])
    try:
        log.info("dashboard: %s", render(rows, Path(output_dir) / "dashboard.png", title=Path(output_dir).name))
    except Exception as ex:  # a plot must never fail a finished run
        log.warning("could not draw the dashboard: %s", ex)


def train_step(engine, micro_batches: List[Dict[str, torch.Tensor]], world_size: int, device: torch.device,
               check_grads: bool, source_names: List[str],
               phase=contextlib.nullcontext, ewc: Optional[EWC] = None, poison: bool = False) -> Dict[str, float]:
    """One optimizer step over this rank's micro-batches; the loss is the mean over every supervised
    token of the step on all ranks (see trainer/loss.py). With several sources, each one's loss too.
    `phase(name)` is a context manager timing a part of the step (PerfMeter.phase). Rows whose loss
    is not finite come back as nonfinite_rows: (source, row, micro-batch) of this rank.
    `poison`: fault injection, a NaN loss in the first micro-batch (trainer/faults.py)."""
    counts = torch.tensor([[supervised_tokens(b["labels"]), int(b["real_tokens"]), b["labels"].numel()]
                           for b in micro_batches], dtype=torch.float64).sum(0)
    distributed.all_reduce_sum(counts)
    step_supervised, step_real, step_slots = (float(c) for c in counts)
    scale = backward_scale(int(step_supervised), world_size)
    lr = engine.get_lr()[0]
    # Per source: [loss sum, supervised tokens, real tokens]; row 0 of the sums is the whole step.
    sums = torch.zeros(len(source_names) + 1, 3, dtype=torch.float64)
    nonfinite_rows = []
    for m, batch in enumerate(micro_batches):
        with phase("forward_backward"):
            out = engine(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                         use_cache=False)
            rows = row_loss_sums(out.logits, batch["labels"])
            if poison and m == 0:
                rows = rows * torch.tensor(float("nan"), device=rows.device)
            loss = rows.sum()
            engine.backward(loss * scale, scale_wrt_gas=False)
        if check_grads and engine.is_gradient_accumulation_boundary():
            _check_every_parameter_has_a_gradient(engine)
        if ewc is not None and engine.is_gradient_accumulation_boundary():
            sums[0, 0] = ewc.before_step()  # EWC's gradient joins the loss's, before clipping
        with phase("optimizer"):
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        tokens = (batch["labels"][:, 1:] != IGNORE).sum(1).double()
        row_sums = rows.detach().double().cpu()  # the step's one device -> host copy of the losses
        bad = ~torch.isfinite(row_sums)
        if bad.any():
            nonfinite_rows += [(source_names[int(batch["source"][i])], int(batch["row"][i]), m)
                               for i in bad.nonzero().flatten().tolist()]
        sums[1:, 0].index_add_(0, batch["source"], row_sums)
        sums[1:, 1].index_add_(0, batch["source"], tokens)
        sums[1:, 2].index_add_(0, batch["source"], batch["filled"].double())
    penalty = float(sums[0, 0])  # this rank's part of the EWC penalty (0 without EWC)
    sums[0] = sums[1:].sum(0)
    sums = torch.cat([sums, torch.tensor([[penalty, 0.0, 0.0]], dtype=torch.float64)])
    distributed.all_reduce_sum(sums)
    grad_norm = engine.get_global_grad_norm()
    per_source = {}
    if len(source_names) > 1:
        per_source = {f"train/{name}/loss": float(sums[j + 1, 0] / sums[j + 1, 1])
                      for j, name in enumerate(source_names) if sums[j + 1, 1] > 0}
        per_source.update({f"data/{name}/token_fraction": float(sums[j + 1, 2] / max(float(sums[0, 2]), 1.0))
                           for j, name in enumerate(source_names)})
    if ewc is not None:
        per_source["reg/ewc_penalty"] = float(sums[-1, 0])
    if "replay" in source_names:
        per_source["data/replay_token_fraction"] = per_source.get("data/replay/token_fraction", 0.0)
    return {"train/loss": float(sums[0, 0]) / max(step_supervised, 1.0), **per_source,
            "train/lr": lr,
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "data/packing_efficiency": step_real / step_slots,
            "data/supervised_token_fraction": step_supervised / step_slots,
            "tokens": step_real, "supervised_tokens": step_supervised, "step_tokens": step_real,
            "nonfinite_rows": nonfinite_rows}


def _nonfinite(state: TrainState, metrics: Dict[str, float], bad_rows: List, step_rows: List, names: List[str],
               t) -> None:
    """A step with a NaN/inf loss or gradient: DeepSpeed has already dropped its update (the
    weights are as before the step). Name the step and the rows, then stop or, with
    trainer.on_nonfinite=skip, go on within trainer.max_skipped_steps. Called on every rank (the
    loss and DeepSpeed's overflow flag are reduced over ranks), so all ranks decide alike."""
    ranks = distributed.all_gather_object((bad_rows, step_rows))
    culprits = [f"{src}:row {row} (rank {r}, micro-batch {m})" for r, (rows, _) in enumerate(ranks)
                for src, row, m in rows]
    if culprits:
        where = f"rows with a non-finite loss: {', '.join(culprits[:20])}{' ...' if len(culprits) > 20 else ''}"
    else:  # the loss was finite everywhere: the gradient overflowed; name the whole step
        rows = [f"{names[src]}:row {row}" for _, per_micro in ranks for micro in per_micro for src, row in micro]
        where = (f"every row's loss was finite (the gradient overflowed); the step's rows: {', '.join(rows[:40])}"
                 f"{' ...' if len(rows) > 40 else ''}")
    what = (f"non-finite loss/gradient at step {state.step} (loss={metrics['train/loss']}, grad_norm="
            f"{metrics['train/grad_norm']}): {where}. The update was skipped; the weights are those of step "
            f"{state.step - 1}.")
    if t.on_nonfinite == "skip" and state.skipped_steps <= t.max_skipped_steps:
        log.warning("%s Skipped (%d of at most trainer.max_skipped_steps=%d).", what, state.skipped_steps,
                    t.max_skipped_steps)
        return
    if t.on_nonfinite == "skip":
        advice = (f"{state.skipped_steps} steps skipped, more than trainer.max_skipped_steps={t.max_skipped_steps}: "
                  "the run is diverging or the data is bad.")
    else:
        advice = "trainer.on_nonfinite=skip would skip such steps (counted in train/skipped_steps)."
    raise RuntimeError(f"{what} Stopped, without saving: the last checkpoint is intact. Inspect those rows "
                       f"(data_pipeline: source name and row of the prepared cache) or lower trainer.lr; {advice}")


def _general_baseline(earlier_output_dir: Optional[str]) -> Dict[str, float]:
    """The general-set step-0 eval of an earlier stage (its final trainer_state.json), or nothing."""
    if not earlier_output_dir:
        return {}
    ckpt = Path(earlier_output_dir) / "checkpoints"
    state = json.loads((ckpt / (ckpt / "latest").read_text().strip() / "trainer_state.json").read_text())
    return {k: v for k, v in state.get("baseline", {}).items() if k.startswith("eval/general/")}


def _reference_loss(engine, batch: Dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """The mean token loss of one reference batch over all ranks, scaled for DeepSpeed's averaging
    (for EWC's Fisher: the squared gradient of exactly this loss)."""
    count = torch.tensor([float(supervised_tokens(batch["labels"]))], dtype=torch.float64)
    distributed.all_reduce_sum(count)
    out = engine(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                 use_cache=False)
    return row_loss_sums(out.logits, batch["labels"]).sum() * backward_scale(int(count), distributed.world_size())


def _ewc_args(cfg: Config) -> Dict:
    e = cfg.regularizer.ewc
    return {"lam": e.lam, "gamma": e.gamma, "normalise": e.normalise}


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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)

