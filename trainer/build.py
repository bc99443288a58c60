"""Everything one stage needs, built in the order a failure should surface: config checks and the
tokenizer in seconds, then the data, then the model under ZeRO-3 and its DeepSpeed engine, then
the resume; then the parts the loop calls (trainer/components.py). `build(cfg)` returns a `Run`;
trainer/loop.py trains it.

Which components a stage has, and in which order the loop calls them:

    faults        (tests only) arms a NaN loss before a chosen step
    EWC           regularizer=ewc*: Fisher at the start; its gradient at each optimizer step
    LogWindow     one line every trainer.cadence.log_every_steps steps
    Evaluation    held-out sets at step 0, every trainer.cadence.eval_every_steps, and the last step
    Harness       eval.harness's lm-eval tasks at step 0, every eval.harness.every_steps, the last step
    Checkpointer  at trainer.cadence.save_every_steps, the last step, and an early stop
    Interpolation regularizer.interpolation: θ0 + α(θ − θ0) chosen after the last step
    Export        output_dir/hf after the last step
    Summary       the forgetting summary and the PNG dashboard
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import torch

from data_pipeline.choices import OffloadDevice, StageObjective
from data_pipeline.loader import StepLoader
from trainer import distributed, faults
from trainer.checkpointing import layout, preemption
from trainer.checkpointing.checkpoint import Checkpointer, TrainState
from trainer.checkpointing.export import Export
from trainer.components import BatchSource, Component
from trainer.config import Config
from trainer.config import config_tree as plain_config_tree
from trainer.data import TrainingData, cache_dir, prepare_data, prepare_own_answers
from trainer.engine.deepspeed_config import build_deepspeed_config
from trainer.engine.model import build_model, count_parameters, model_config
from trainer.engine.optim import build_optimizer
from trainer.engine.tokenizer import load_tokenizer
from trainer.evaluate import Evaluation
from trainer.forgetting import distill, freezing, interpolation, mft, rehearsal
from trainer.forgetting.ewc import EWC
from trainer.objectives import Objective, build_objective, reference
from trainer.observability.generation import Generator
from trainer.observability.logs import setup_logging
from trainer.observability.metrics import MetricWindow
from trainer.observability.perf import PerfMeter
from trainer.observability.redaction import redact
from trainer.observability.tracking import LogWindow, Summary

log = logging.getLogger("trainer")


@dataclass
class Run:
    """One stage, built and resumed: what trainer/loop.py trains."""

    cfg: Config
    dist: distributed.DistInfo
    engine: Any
    data: TrainingData
    batches: BatchSource
    objective: Objective
    state: TrainState
    components: List[Component]
    perf: PerfMeter
    window: MetricWindow
    stop: preemption.Preemption
    config_tree: Dict[str, Any]

    def close(self) -> None:
        """Release DeepSpeed's hooks and buffers (the process group outlives the run: a recipe's next
        stage uses it; trainer.distributed.shutdown ends it)."""
        self.engine.destroy()
        self.components.clear()


def build(cfg: Config) -> Run:
    """Build and resume one stage of training. Collective."""
    t = cfg.trainer
    stop = preemption.install(t.max_time)  # USR1/TERM/max_time: a flag the loop checks each step
    dist = distributed.init(t.failure.dist_timeout_s)
    setup_logging(dist.rank)
    # grad_accum_steps as set, or derived: from trainer.global_batch_size, or on a resume what keeps
    # the checkpoint's global batch on this world size (read from files: seconds).
    cfg = layout.resolve_config_batch(cfg, dist.world_size)
    t = cfg.trainer
    config_tree = redact(plain_config_tree(cfg))
    _announce_config(config_tree, cfg.output_dir, dist)
    random.seed(t.seed)
    torch.manual_seed(t.seed)

    # One process per node trains the tokenizer (if any) before the others load it.
    with distributed.local_rank_zero_first():
        tokenizer = load_tokenizer(cfg.model)
    # Everything that can be checked without data or weights fails here, in seconds.
    hf_config = model_config(cfg.model, tokenizer, cfg.data.seq_len, packed=cfg.data.packing)
    interpolation.check(cfg, baseline_expected=cfg.eval.at_start)
    tasks = None
    if cfg.eval.harness.enabled:  # lm-eval is imported only when asked for (seconds of imports)
        from trainer import harness

        tasks = harness.task_manager(
            cfg.eval.harness.include_path, [*cfg.eval.harness.tasks, *cfg.eval.harness.chat_tasks]
        )
        harness.check_tasks(cfg.eval.harness.tasks, tasks)
        harness.check_tasks(cfg.eval.harness.chat_tasks, tasks, chat=True, tokenizer=tokenizer)
    distilling = cfg.regularizer.distill.enabled
    if distilling and cfg.regularizer.distill.prompts:  # checked before any data or weights are read
        try:
            found = rehearsal.read_prompts(Path(cfg.regularizer.distill.prompts))
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"regularizer.distill.prompts: {e}") from None
        if not found:
            raise ValueError(
                f"regularizer.distill.prompts={cfg.regularizer.distill.prompts}: no prompts in it (a prompt a "
                'line in a .txt; in a .jsonl a record a line with "prompt", "instruction" or "messages")'
            )
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"regularizer.distill.prompts={cfg.regularizer.distill.prompts}: the start answers them as chat "
                f"turns, and the tokenizer of model.name_or_path={cfg.model.name_or_path} has no chat template; "
                "set model.chat_template, or distill on a file (regularizer.distill.data)"
            )
    ds_config = build_deepspeed_config(
        cfg.deepspeed, t, dist.world_size, dist.on_gpu, extra_micro_batches=int(distilling)
    )
    # Prepared once per cache (the node's first process prepares, the others wait on the filesystem).
    data = prepare_data(cfg, tokenizer, preparer=dist.local_rank == 0, progress=dist.is_main)
    pad = None if cfg.data.packing else cfg.data.pad_to_multiple_of  # unpacked rows: to the longest

    # The model, partitioned at construction, and the engine around it.
    import deepspeed

    from trainer.distributed.ops import import_muon_uncompiled

    import_muon_uncompiled()  # 2.2 s a rank of torch.compile for an optimizer never used
    precision = "bf16" if ds_config["bf16"]["enabled"] else "fp32"
    teacher = None
    if distilling and cfg.regularizer.distill.teacher:  # another model: its own pass, freed before the student
        teacher = distill.attach_other_teacher(cfg, tokenizer, hf_config, ds_config, data.distill, precision, dist)
    model = build_model(cfg.model, hf_config, t, ds_config, tokenizer)
    if cfg.regularizer.freeze.enabled:  # before the optimizer: it holds state for trainable tensors only
        freezing.freeze(model, cfg.regularizer.freeze.first_blocks, cfg.regularizer.freeze.embeddings)
    optimizer, scheduler = build_optimizer(model, t, cpu_offload=cfg.deepspeed.offload_optimizer != OffloadDevice.none)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    bf16 = ds_config["bf16"]["enabled"]

    # What the stage minimises; a preference loss's reference log-probs are computed by the starting
    # weights now, once, before a resume replaces them.
    objective = build_objective(cfg.stage)
    start = reference.start_key(cfg.model, t.seed, precision, tokenizer)
    if objective.needs_reference:
        named = {**dict(zip(data.names, data.sources)), **{f"eval/{n}": s for n, s in data.eval_sets.items()}}
        reference.attach(
            engine,
            named,
            start,
            cfg.eval.micro_batch_size,
            dist.rank,
            dist.world_size,
            engine.device,
            writer=dist.local_rank == 0,
        )

    # regularizer.distill's teacher is by default the stage's start too: its top-k, computed now, once,
    # on its own answers to regularizer.distill.prompts when those are the distill data.
    if distilling and cfg.regularizer.distill.prompts:
        d = cfg.regularizer.distill
        answers = rehearsal.own_answers(
            engine,
            tokenizer,
            d.prompts,
            start,
            cache_dir(cfg),
            d.answer_tokens,
            d.keep_cut_off,
            d.answer_batch_size,
            dist.rank,
            dist.world_size,
            dist.local_rank,
            system_prompt=cfg.stage.system_prompt,  # as the distill data is then prepared (and training renders)
        )
        data.distill = prepare_own_answers(cfg, tokenizer, str(answers), dist.local_rank == 0, dist.is_main)
    if distilling and teacher is None:
        teacher = distill.attach(
            engine,
            data.distill,
            start,
            cfg.regularizer.distill.top_k,
            cfg.eval.micro_batch_size,
            dist.rank,
            dist.world_size,
            engine.device,
            writer=dist.local_rank == 0,
        )

    # regularizer.mft's targets: the stage's start's top-k on every training row, computed now, once.
    teachers = None
    if cfg.regularizer.mft.enabled:
        m = cfg.regularizer.mft
        positions = t.max_steps * t.micro_batch_size * t.grad_accum_steps * dist.world_size
        teachers = mft.attach(
            engine,
            data.sources,
            data.names,
            mft.rows_needed(data.sources, data.weights, t.seed, positions),
            start,
            m.top_k,
            m.tau,
            cfg.eval.micro_batch_size,
            dist.rank,
            dist.world_size,
            engine.device,
            writer=dist.local_rank == 0,
        )

    e = cfg.regularizer.ewc
    ewc = None
    if cfg.regularizer.uses_ewc:
        fisher_batches = StepLoader(
            [data.fisher],
            [1.0],
            t.micro_batch_size,
            e.fisher_batches,
            dist.rank,
            dist.world_size,
            t.seed,
            pad_to_multiple_of=pad,
        )
        ewc = EWC(
            engine,
            e.lam,
            e.gamma,
            e.normalise,
            reference=fisher_batches,
            labels=e.fisher_labels,
            seed=t.seed,
            previous=e.previous,
        )
    checkpointer = Checkpointer(
        cfg.output_dir,
        t.cadence.keep_last,
        dist.rank,
        dist.world_size,
        fallback=t.resume.fallback,
        tokenizer=tokenizer,
        extras={"ewc": ewc} if ewc else None,
        every_steps=t.cadence.save_every_steps,
        elastic=t.resume.elastic,
    )
    # Restores EWC's Fisher and anchor too; a checkpoint of another world size is resharded.
    state = checkpointer.resume(engine)
    layout.continue_data(state, t, dist.world_size)
    if state.step > 0 and cfg.model.name_or_path:
        log.warning(
            "resuming at step %d: the weights come from the checkpoint, not from model.name_or_path=%s "
            "(which only started step 0); use a new output_dir to start again from %s",
            state.step,
            cfg.model.name_or_path,
            cfg.model.name_or_path,
        )

    batches = StepLoader(
        data.sources,
        data.weights,
        t.micro_batch_size,
        t.grad_accum_steps,
        dist.rank,
        dist.world_size,
        t.seed,
        pad_to_multiple_of=pad,
        origin=tuple(state.data_origin),
    )
    if teachers is not None:
        batches = mft.CorrectedTargets(batches, teachers, cfg.regularizer.mft.tau, data.names)
    if distilling:
        d = cfg.regularizer.distill
        batches = distill.DistillSource(
            batches, data.distill, teacher, d.rows, d.weight, dist.rank, dist.world_size, t.seed
        )
    generator = Generator(
        cfg.eval.sample_prompts,
        cfg.eval.sample_max_new_tokens,
        tokenizer,
        chat=cfg.stage.objective != StageObjective.pretrain,
        system_prompt=cfg.stage.system_prompt,
    )
    evaluation = Evaluation(
        engine,
        data.eval_sets,
        cfg.eval.micro_batch_size,
        t.cadence.eval_every_steps,
        cfg.eval.at_start,
        cfg.eval.baseline_from,
        generator,
        dist.rank,
        dist.world_size,
        engine.device,
        pad,
        objective if objective.unit == "pairs" else None,
    )
    perf = PerfMeter.for_model(engine.module, cfg.data.seq_len, dist.world_size, dist.rank, dist.on_gpu, bf16=bf16)
    window = MetricWindow(data.names)

    objective, injected = faults.inject(objective, dist.rank)
    components: List[Component] = [
        *injected,
        *([ewc] if ewc else []),
        LogWindow(window, perf, t.cadence.log_every_steps, t.max_steps, enabled=dist.is_main),
        evaluation,
        checkpointer,
    ]
    if tasks is not None:
        h = cfg.eval.harness
        lm = harness.EngineLM(
            engine, tokenizer, engine.device, h.max_length, cfg.eval.micro_batch_size, h.gen_batch_size
        )
        components.insert(
            -1,
            harness.HarnessEvaluation(
                lm, h, tasks, cfg.output_dir, cfg.eval.at_start if h.at_start is None else h.at_start, dist.is_main
            ),
        )
    interp = None
    if t.export_hf:
        if cfg.regularizer.interpolation.enabled:
            interp = interpolation.Interpolation(engine, cfg, evaluation.scores, dist.rank)
            components.append(interp)
    if t.export_hf:
        components.append(Export(engine, tokenizer, cfg.output_dir, dist.rank, interpolation=interp))
    components.append(Summary(cfg.output_dir, cfg.logger.dashboard, enabled=dist.is_main))
    log.info(
        "%s parameters | world %d | %d rows x %d tokens | %d rows per step | steps %d -> %d",
        f"{count_parameters(engine.module):,}",
        dist.world_size,
        sum(len(s) for s in data.sources),
        cfg.data.seq_len,
        batches.rows_per_step,
        state.step,
        t.max_steps,
    )
    return Run(cfg, dist, engine, data, batches, objective, state, components, perf, window, stop, config_tree)


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


def same_model(cfg: Config) -> bool:
    """output_dir/config.yaml (the last start's) names the model this run asks for. A finished run of
    another model in the same output_dir is not this run's, so it is not skipped."""
    from omegaconf import OmegaConf

    try:
        saved = OmegaConf.to_container(OmegaConf.load(Path(cfg.output_dir) / "config.yaml"))["model"]
    except (OSError, KeyError, TypeError, ValueError):
        return False
    ours = dataclasses.asdict(cfg.model)
    return all(saved.get(k) == ours.get(k) for k in MODEL_IDENTITY)
