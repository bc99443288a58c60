"""Reference log-probs, computed once: what DPO compares the policy with, without a second model.

Before the first step of a dpo stage, the stage's starting weights (the ZeRO-3 engine just built,
before a resume loads a checkpoint into it) score every training and eval pair once: each
document's summed completion log-prob, [rows, documents] per prepared source. The result is stored
with the prepared data, under a key of those starting weights:

    <prepared source>/reference/<start key>.npy      float64 [rows, documents per row]

so a rerun or a resume (any step, any world size) reuses it and a different start (another export,
another seed, another precision) computes its own. Peers keep a frozen copy of the model in memory
for this (a second DeepSpeed engine: twice the parameters) or precompute it outside ZeRO-3; here it is
one no-grad pass of the engine that trains, rows spread over the ranks like an evaluation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Dict

import numpy as np
import torch

from data_pipeline.prepare import Prepared, _file_fingerprint, tokenizer_fingerprint
from trainer import distributed
from trainer.objectives import head
from trainer.objectives.preference import document_sums

log = logging.getLogger("trainer")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def start_key(model_cfg, seed: int, precision: str, tokenizer) -> str:
    """A key of the starting weights: the files of model.name_or_path (size, mtime, first and last MiB,
    as the data cache keys its sources), or the random init's recipe (type, arch, seed); with the
    precision the pass runs in and the tokenizer."""
    if model_cfg.name_or_path:
        root = Path(model_cfg.name_or_path)
        files = sorted(p for p in root.iterdir() if p.suffix in WEIGHT_SUFFIXES or p.name == "config.json")
        weights = [_file_fingerprint(p) for p in files]
    else:
        weights = {"model_type": model_cfg.model_type, "arch": model_cfg.arch, "seed": seed}
    identity = {
        "weights": weights,
        "precision": precision,
        "attention": str(model_cfg.attn_implementation),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def attach(
    engine,
    sources: Dict[str, Prepared],
    key: str,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    device: torch.device,
    writer: bool,
) -> None:
    """Give every preference source its `reference` array: from its cache when every rank has it, else
    computed now by all ranks and written by the `writer`s (one process per node). Collective."""
    sources = {name: src for name, src in sources.items() if src.is_preference}
    if not sources:
        return
    width = max(src.documents_per_row for src in sources.values())
    for name, src in sources.items():
        path = src.directory / "reference" / f"{key}.npy"
        missing = torch.tensor([0.0 if path.exists() else 1.0], dtype=torch.float64)
        distributed.all_reduce_sum(missing)
        if not missing.item():
            reference = np.load(path)
            log.info("reference log-probs of %s: reused (%d rows, start %s)", name, len(reference), key)
        else:
            started = time.time()
            reference = _score(engine, src, micro_batch_size, rank, world_size, device)
            if writer:
                path.parent.mkdir(exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                with open(tmp, "wb") as f:
                    np.save(f, reference)
                os.replace(tmp, path)  # atomic: a reader sees the whole array or none
            log.info(
                "reference log-probs of %s: %d pairs scored once in %.1f s (start %s) -> %s",
                name,
                int(src.stats.get("pairs", 0)),
                time.time() - started,
                key,
                path,
            )
        src.reference = np.pad(reference, ((0, 0), (0, width - reference.shape[1])))


@torch.no_grad()
def _score(
    engine, src: Prepared, micro_batch_size: int, rank: int, world_size: int, device: torch.device
) -> np.ndarray:
    """Every row's per-document completion log-probs under the engine's current weights. Every rank runs
    the same number of forwards (ZeRO-3 gathers parameters collectively); its rows, or a repeat of row
    0 whose result is dropped."""
    documents = src.documents_per_row
    out = torch.zeros(len(src), documents, dtype=torch.float64)
    per_round = micro_batch_size * world_size
    was_training = engine.module.training
    engine.eval()
    for r in range(math.ceil(len(src) / per_round)):
        first = r * per_round + rank * micro_batch_size
        idx = [i for i in range(first, first + micro_batch_size) if i < len(src)]
        rows = {k: torch.from_numpy(v) for k, v in src.rows(idx or [0]).items()}
        sums, _ = document_sums(-head.score(engine, rows, device), rows["labels"], rows["document"], documents)
        if idx:
            out[idx] = sums.double().cpu()
    if was_training:
        engine.train()
    distributed.all_reduce_sum(out)
    return out.numpy()
