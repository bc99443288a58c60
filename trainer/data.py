"""From the typed config to prepared, memory-mapped data: the training sources (main + weighted
extras) and the held-out eval sets. Used by the training loop and by launch/prepare_data.py, so
both compute the same cache keys."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from data_pipeline.choices import StageObjective
from data_pipeline.preference import is_preference_source
from data_pipeline.prepare import Prepared, PrepareOptions, prepare_shard
from data_pipeline.prepare import prepare as prepare_source
from trainer.config import Config
from trainer.paths import cache_root

log = logging.getLogger("trainer")


@dataclass
class TrainingData:
    names: List[str]
    sources: List[Prepared]
    weights: List[float]
    eval_sets: Dict[str, Prepared]
    fisher: Optional[Prepared] = None
    """EWC's reference data, when EWC is on."""
    distill: Optional[Prepared] = None
    """The sequences regularizer.distill distils on, when it is on."""


def cache_dir(cfg: Config) -> str:
    return cfg.data.cache_dir or str(cache_root() / "data")


def options(cfg: Config, fmt: str, objective: Optional[str] = None) -> PrepareOptions:
    """How a source is prepared: the stage's objective unless `objective` (a replay source's own) says otherwise."""
    d = cfg.data
    objective = objective or cfg.stage.objective
    return PrepareOptions(
        objective=objective,
        seq_len=d.seq_len,
        fmt=fmt,
        on_error=d.on_error,
        overlong=cfg.overlong_for(objective),
        packing=d.packing,
        system_prompt=cfg.stage.system_prompt,
        split=d.split,
    )


def prepare_data(
    cfg: Config, tokenizer, preparer: bool, progress: bool = False, shard: Optional[Tuple[int, int]] = None
) -> Optional[TrainingData]:
    """Every source and eval set, from the cache or prepared now. Only processes with preparer=True
    prepare; the others wait for them on the filesystem. shard=(i, n): only tokenize array task i's
    share of every source's units (launch/prepare_data.py --shard), returning None; a later call
    without it packs them."""
    d = cfg.data
    specs = [(d.name, d.path, d.format, d.weight, None)]
    specs += [(name, s.path, s.format, s.weight, None) for name, s in d.sources.items()]
    reg = cfg.regularizer
    if reg.uses_replay:
        # Replay takes `ratio` of the tokens; the other sources share the rest by their weights.
        total = sum(spec[3] for spec in specs)
        specs = [(n, p, f, w / total * (1 - reg.replay.ratio), o) for n, p, f, w, o in specs]
        specs.append(("replay", reg.replay.path, reg.replay.format, reg.replay.ratio, reg.replay.objective))
    where = cache_dir(cfg)
    kw = dict(
        cache_dir=where, preparer=preparer, timeout_s=d.prepare_timeout_s, progress=progress, workers=d.prepare_workers
    )

    def prepare(path: str, tokenizer, opts: PrepareOptions, **kw) -> Optional[Prepared]:
        if shard is None:
            return prepare_source(path, tokenizer, opts, **kw)
        log.info(prepare_shard(path, tokenizer, opts, where, *shard, workers=d.prepare_workers, progress=progress))
        return None

    sources = [prepare(path, tokenizer, options(cfg, fmt, objective), **kw) for _, path, fmt, _, objective in specs]
    # In a dpo stage, eval sets of pairs are scored as pairs; the others (general text, held-out
    # answers) by their token loss, as the stage's token_objective prepares them.
    token = cfg.stage.token_objective
    eval_sets = {
        name: prepare(path, tokenizer, options(cfg, "auto", _eval_objective(cfg, path)), **kw)
        for name, path in cfg.eval.sets.items()
    }
    fisher = None
    if reg.uses_ewc:
        own = reg.ewc.fisher_data is not None  # else the replay data, prepared as replay prepares it
        fisher = prepare(
            reg.ewc.fisher_data if own else reg.replay.path,
            tokenizer,
            options(cfg, "auto", token) if own else options(cfg, reg.replay.format, reg.replay.objective or token),
            **kw,
        )
    distill = None
    if reg.distill.enabled and reg.distill.prompts is None:  # own answers: prepared once generated (build.py)
        if reg.distill.data is not None:
            path, opts = reg.distill.data, options(cfg, "auto", reg.distill.objective or token)
        else:  # the replay data, prepared as replay prepares it
            objective = reg.distill.objective or reg.replay.objective or token
            path, opts = reg.replay.path, options(cfg, reg.replay.format, objective)
        distill = prepare(path, tokenizer, opts, **kw)
    if shard is not None:
        return None
    for (name, path, _, weight, _), src in zip(specs, sources):
        log.info(
            "source %s (weight %g): %s -> %d rows, packing efficiency %.4f, %s",
            name,
            weight,
            path,
            len(src),
            src.stats["packing_efficiency"],
            _counts(src.stats),
        )
    return TrainingData([s[0] for s in specs], sources, [s[3] for s in specs], eval_sets, fisher, distill)


def prepare_own_answers(cfg: Config, tokenizer, path: str, preparer: bool, progress: bool) -> Prepared:
    """regularizer.distill.prompts' answers (a messages JSONL the engine wrote) prepared as distill data:
    the KL on the answers (objective instruct) unless regularizer.distill.objective says otherwise."""
    objective = cfg.regularizer.distill.objective or StageObjective.instruct
    d = cfg.data
    kw = dict(
        cache_dir=cache_dir(cfg),
        preparer=preparer,
        timeout_s=d.prepare_timeout_s,
        progress=progress,
        workers=d.prepare_workers,
    )
    return prepare_source(path, tokenizer, options(cfg, "auto", objective), **kw)


def _eval_objective(cfg: Config, path: str):
    if cfg.stage.objective != StageObjective.dpo:
        return None
    return StageObjective.dpo if is_preference_source(path, cfg.data.split) else cfg.stage.token_objective


def _counts(stats: Dict) -> str:
    keys = (
        "records",
        "samples",
        "pairs",
        "skipped_malformed",
        "truncated_overlong",
        "dropped_overlong",
        "split_overlong",
        "dropped_no_supervised_tokens",
    )
    return ", ".join(f"{k} {int(stats[k])}" for k in keys if stats.get(k))
