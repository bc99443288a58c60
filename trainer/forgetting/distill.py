"""Distillation toward the stage's start on chosen sequences (`regularizer.distill`).

Each optimizer step gets one more micro-batch, `regularizer.distill.rows` rows a rank of the distill
data (usually the replay data: general text, or the base's own chat answers from launch/rehearse.py),
and adds λ·KL_k(teacher ‖ model) averaged over its supervised tokens on all ranks to the stage's loss.
The stage's own rows and tokens stay as they are: replay takes a share of each step's tokens, this
adds to them. Each distilled token carries the teacher's whole next-token distribution (its top k and
the residual mass, trainer/objectives/distill.py), not one sampled or greedy token: forgetting tracks
the forward KL to the base (Shenfeld et al. 2025), and KL to the base on its own samples beat replay
in Bansal & Sanghavi 2025.

The teacher is the stage's start, or a model directory (`regularizer.distill.teacher`, e.g. a larger
model of the same family: plain knowledge distillation). Its top-k distributions are computed once,
before the first step, rows spread over the ranks as in an evaluation: for the stage's start by the
engine just built (before a resume replaces its weights); for another teacher by a ZeRO-3 engine of
its own, built, used and freed before the student is built (never two models in memory). They are
stored with the prepared distill data under a key of the teacher's weights:

    <prepared source>/distill/<start key>-top<k>/{ids.npy int32, logp.npy float32}   [rows, seq - 1, k]

so a rerun, a resume and another world size reuse them, and no second model is in memory during
training. The rows of step s on rank r are a fixed function of (s, r, trainer.seed): a resume replays
exactly the rows and teacher targets the straight run would have used.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from data_pipeline.prepare import Prepared
from trainer import distributed
from trainer.objectives import head

log = logging.getLogger("trainer")


def teacher_dir(src: Prepared, key: str, k: int) -> Path:
    return src.directory / "distill" / f"{key}-top{k}"


def _stored(where: Path, key: str, k: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """The stored top-k (memory-mapped) when every rank sees them, else None. Collective."""
    missing = torch.tensor([0.0 if (where / "logp.npy").exists() else 1.0], dtype=torch.float64)
    distributed.all_reduce_sum(missing)
    if missing.item():
        return None
    ids, logp = np.load(where / "ids.npy", mmap_mode="r"), np.load(where / "logp.npy", mmap_mode="r")
    log.info("regularizer.distill: the teacher's top-%d of %d rows reused (teacher %s)", k, len(ids), key)
    return ids, logp


def write_arrays(where: Path, arrays: Dict[str, np.ndarray]) -> None:
    """Write `arrays` as <name>.npy into the directory `where`, atomically: a reader sees all or none."""
    tmp = where.with_name(f".{where.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, value in arrays.items():
        np.save(tmp / f"{name}.npy", value)
    shutil.rmtree(where, ignore_errors=True)
    os.replace(tmp, where)


def attach(
    engine,
    src: Prepared,
    key: str,
    k: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    device: torch.device,
    writer: bool,
) -> Tuple[np.ndarray, np.ndarray]:
    """The teacher's top-k ids and log-probs for every row of `src`: read when every rank has them,
    else computed now by all ranks with the engine's current weights and written by the `writer`s
    (one process per node). Collective."""
    where = teacher_dir(src, key, k)
    stored = _stored(where, key, k)
    if stored is not None:
        return stored
    started = time.time()
    ids, logp = score_rows(engine, src, k, micro_batch_size, rank, world_size, device)
    if writer:
        write_arrays(where, {"ids": ids, "logp": logp})
    log.info(
        "regularizer.distill: the teacher's top-%d of %d rows computed once in %.1f s (teacher %s, %.1f MB) -> %s",
        k,
        len(ids),
        time.time() - started,
        key,
        (ids.nbytes + logp.nbytes) / 1e6,
        where,
    )
    return ids, logp


@torch.no_grad()
def score_rows(
    engine,
    src: Prepared,
    k: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    device,
    with_labels: bool = False,
    which: Optional[Sequence[int]] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """The top-k of rows `which` of `src` (default: every row) under the engine's current weights,
    [len(which), seq - 1, k]; with_labels: each position's label among them. Every rank runs the same
    number of forwards (ZeRO-3 gathers parameters collectively): its rows, or a repeat of the first
    whose result is dropped; the ranks' parts are summed (each row is written by one rank). Collective."""
    which = list(range(len(src))) if which is None else [int(i) for i in which]
    n, width = len(which), src.input_ids.shape[1] - 1
    ids = torch.zeros(n, width, k, dtype=torch.int32)
    logp = torch.zeros(n, width, k, dtype=torch.float32)
    per_round = micro_batch_size * world_size
    was_training = engine.module.training
    engine.eval()
    for r in range(-(-n // per_round)):
        first = r * per_round + rank * micro_batch_size
        idx = [i for i in range(first, first + micro_batch_size) if i < n]
        rows = {key: torch.from_numpy(v) for key, v in src.rows([which[i] for i in idx] or which[:1]).items()}
        top_ids, top_logp = head.teacher_topk(engine, rows, device, k, with_labels)
        if idx:
            ids[idx], logp[idx] = top_ids.int().cpu(), top_logp.float().cpu()
    if was_training:
        engine.train()
    distributed.all_reduce_sum(ids)
    distributed.all_reduce_sum(logp)
    return ids.numpy(), logp.numpy()


def check_teacher(teacher_dir: str, tokenizer, hf_config) -> None:
    """Another teacher must predict over the student's vocabulary, token for token: the same
    vocabulary size and the same token -> id map. Raises, naming what differs and what to do."""
    from transformers import AutoConfig, AutoTokenizer

    key = "regularizer.distill.teacher"
    if not (Path(teacher_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{key}={teacher_dir!r} is not a local Hugging Face model directory (no config.json)")
    theirs = AutoConfig.from_pretrained(teacher_dir).vocab_size
    if theirs != hf_config.vocab_size:
        raise ValueError(
            f"{key}={teacher_dir!r} predicts over {theirs} tokens and the model trained here over "
            f"{hf_config.vocab_size}: distillation needs one vocabulary; use a teacher of the same family "
            "(the same tokenizer), or regularizer.distill.teacher=null (the stage's start)"
        )
    vocab = AutoTokenizer.from_pretrained(teacher_dir).get_vocab()
    ours = tokenizer.get_vocab()
    if vocab != ours:
        differ = sorted(set(vocab.items()) ^ set(ours.items()))[:3]
        raise ValueError(
            f"{key}={teacher_dir!r}: its tokenizer maps tokens to other ids than the model trained here "
            f"(e.g. {differ}); distillation compares next-token distributions id by id: use a teacher with "
            "the same tokenizer"
        )


def attach_other_teacher(cfg, tokenizer, hf_config, ds_config, src: Prepared, precision: str, dist) -> Tuple:
    """The top-k of regularizer.distill.teacher on `src`, computed (or reused) before the student is
    built: a ZeRO-3 engine of the teacher alone, freed afterwards. Collective."""
    import dataclasses

    import deepspeed

    from trainer.engine.model import build_model, model_config
    from trainer.objectives import reference

    d = cfg.regularizer.distill
    check_teacher(d.teacher, tokenizer, hf_config)
    teacher_cfg = dataclasses.replace(cfg.model, name_or_path=d.teacher, tokenizer_path=None, stage_overrides={})
    key = reference.start_key(teacher_cfg, cfg.trainer.seed, precision, tokenizer)
    stored = _stored(teacher_dir(src, key, d.top_k), key, d.top_k)
    if stored is not None:  # computed by an earlier start: no teacher to build
        return stored
    log.info("regularizer.distill: building the teacher %s for its top-%d (freed before training)", d.teacher, d.top_k)
    teacher_hf = model_config(teacher_cfg, tokenizer, cfg.data.seq_len, packed=cfg.data.packing)
    model = build_model(teacher_cfg, teacher_hf, cfg.trainer, ds_config, tokenizer)
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    try:
        return attach(
            engine,
            src,
            key,
            d.top_k,
            cfg.eval.micro_batch_size,
            dist.rank,
            dist.world_size,
            engine.device,
            writer=dist.local_rank == 0,
        )
    finally:
        engine.destroy()
        del engine, model
        gc.collect()


class DistillSource:
    """A BatchSource (trainer/components.py): the stage's micro-batches, then one distillation
    micro-batch of `rows` rows carrying the teacher's top-k (teacher_ids, teacher_logp) and the term's
    weight (distill_weight). train_step scores it with the KL instead of the stage's loss."""

    def __init__(
        self,
        inner,
        src: Prepared,
        teacher: Tuple[np.ndarray, np.ndarray],
        rows: int,
        weight: float,
        rank: int,
        world_size: int,
        seed: int,
    ) -> None:
        self.inner, self.src, self.teacher = inner, src, teacher
        self.per_rank, self.weight, self.rank, self.world, self.seed = rows, weight, rank, world_size, seed
        self.rows_per_step = inner.rows_per_step
        self._orders: Dict[int, np.ndarray] = {}

    def indices(self, step: int) -> List[int]:
        """The distill rows of `step` on this rank: position p = (step x world + rank) x rows + j of a
        stream that visits every row once an epoch, in a seeded order of its own each epoch."""
        n, out = len(self.src), []
        for j in range(self.per_rank):
            p = (step * self.world + self.rank) * self.per_rank + j
            epoch = p // n
            if epoch not in self._orders:
                self._orders = {epoch: np.random.default_rng([self.seed, 7, epoch]).permutation(n)}
            out.append(int(self._orders[epoch][p % n]))
        return out

    def batch(self, step: int) -> Dict[str, torch.Tensor]:
        idx = self.indices(step)
        out = {key: torch.from_numpy(np.ascontiguousarray(v)) for key, v in self.src.rows(idx).items()}
        ids, logp = self.teacher
        out["teacher_ids"] = torch.from_numpy(np.ascontiguousarray(ids[idx])).long()
        out["teacher_logp"] = torch.from_numpy(np.ascontiguousarray(logp[idx]))
        out["row"] = torch.tensor(idx)
        filled = torch.from_numpy(np.asarray(self.src.filled[idx]))
        out["filled"], out["real_tokens"] = filled, filled.sum()
        out["distill_weight"] = torch.tensor(self.weight, dtype=torch.float64)
        return out

    def micro_batches(self, step: int) -> List[Dict[str, torch.Tensor]]:
        return self.inner.micro_batches(step) + [self.batch(step)]

    def rows(self, step: int) -> Sequence[Sequence[Tuple[int, int]]]:
        return self.inner.rows(step)  # the stage's rows; a distill row is named by train_step as ("distill", row)
