"""Checkpoints: save, resume, keep the last K, and export to Hugging Face format.

Layout under output_dir/checkpoints:

    step_00000040/      DeepSpeed's sharded ZeRO-3 state (every rank writes its shard)
        trainer_state.json   step and counters (rank 0)
        rng_rank<R>.pt       each rank's RNG states
        COMPLETE             written last, after every rank is done
    latest              the tag of the newest COMPLETE checkpoint, replaced atomically

`latest` moves only after a barrier that every rank reaches after writing everything, so a job
killed mid-save resumes from the previous checkpoint; a directory without COMPLETE is ignored.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from trainer import distributed

log = logging.getLogger("trainer")


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps completed; also the data position (see data_pipeline/loader.py)."""
    tokens_seen: int = 0
    """Non-padding tokens trained on, all ranks."""
    supervised_tokens_seen: int = 0
    """Tokens that carried a loss, all ranks."""
    baseline: Dict[str, float] = field(default_factory=dict)
    """Eval metrics of the model at step 0, the reference for eval/forgetting and eval/domain_gain."""


class Checkpointer:
    def __init__(self, output_dir: str, keep_last: int, rank: int, extras: Optional[Dict[str, Any]] = None) -> None:
        """extras: name -> object with state_dict()/load_state_dict(), saved per rank as <name>_rank<R>.pt
        (e.g. EWC's Fisher and anchor shards) and restored on resume."""
        self.dir = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.extras = extras or {}

    def latest_tag(self) -> Optional[str]:
        latest = self.dir / "latest"
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        if not (self.dir / tag / "COMPLETE").is_file():
            raise RuntimeError(f"{latest} points to {tag}, which is incomplete; delete {self.dir / tag} and point "
                               "latest at the previous complete checkpoint")
        return tag

    def save(self, engine, state: TrainState) -> None:
        tag = f"step_{state.step:08d}"
        engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False)
        torch.save(_rng_state(), self.dir / tag / f"rng_rank{self.rank}.pt")
        for name, obj in self.extras.items():
            torch.save(obj.state_dict(), self.dir / tag / f"{name}_rank{self.rank}.pt")
        if self.rank == 0:
            (self.dir / tag / "trainer_state.json").write_text(json.dumps(asdict(state)))
        distributed.barrier()  # every shard and every rank's files are on disk
        if self.rank == 0:
            (self.dir / tag / "COMPLETE").write_text("")
            tmp = self.dir / "latest.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.dir / "latest")
            self._prune(keep=tag)
        distributed.barrier()
        log.info("saved checkpoint %s", self.dir / tag)

    def _prune(self, keep: str) -> None:
        complete = sorted(p for p in self.dir.glob("step_*") if (p / "COMPLETE").is_file())
        for old in complete[: -self.keep_last]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    def resume(self, engine) -> TrainState:
        """Load the latest complete checkpoint into `engine`; a fresh TrainState if there is none."""
        tag = self.latest_tag()
        if tag is None:
            return TrainState()
        path, _ = engine.load_checkpoint(str(self.dir), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.dir / tag}")
        rng_file = self.dir / tag / f"rng_rank{self.rank}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        else:
            log.warning("%s missing (world size changed?); RNG streams restart from the seed", rng_file)
        for name, obj in self.extras.items():
            extra = self.dir / tag / f"{name}_rank{self.rank}.pt"
            if not extra.is_file():
                raise FileNotFoundError(f"{extra} is missing: this run needs the {name} state saved with the checkpoint "
                                        "(was it saved with another regularizer or number of ranks?)")
            obj.load_state_dict(torch.load(extra, weights_only=True))
        state = TrainState(**json.loads((self.dir / tag / "trainer_state.json").read_text()))
        log.info("resumed from %s at step %d", self.dir / tag, state.step)
        return state


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def export_hf(engine, tokenizer, out_dir: str, rank: int) -> None:
    """Write the model to `out_dir` as a Hugging Face model (safetensors + tokenizer + chat template).

    Every rank takes part in gathering the ZeRO-3 shards (layer by layer, onto rank 0's CPU);
    rank 0 writes. Tied weights stay tied: the gathered state dict holds one tensor under both
    names and save_pretrained stores it once. Written to a temporary directory and renamed, so a
    half-written export never sits at `out_dir`.
    """
    state_dict = engine._zero3_consolidated_16bit_state_dict()
    if rank == 0:
        out, tmp = Path(out_dir), Path(f"{out_dir}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model = engine.module
        model.config.use_cache = True  # the exported model is for inference
        model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        model.config.use_cache = False
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        log.info("exported Hugging Face model to %s", out)
    distributed.barrier()
