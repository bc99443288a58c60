"""Checkpoints: save, verify, resume, keep the last K (the Hugging Face export: export.py).

Layout under output_dir/checkpoints:

    step_00000040/      DeepSpeed's sharded ZeRO-3 state (every rank writes its shard)
        trainer_state.json   step and counters (rank 0)
        rng_rank<R>.pt       each rank's RNG states
        <extra>_rank<R>.pt   e.g. EWC's Fisher and anchor shards
        model/               the model's config.json and tokenizer (rank 0): what launch/export.py
                             needs to make a Hugging Face model of the step on one CPU process
        COMPLETE             written last: the manifest, size and CRC-32 of every file above
    latest              the tag of the newest COMPLETE checkpoint, replaced atomically
    universal/step_00000040/   that checkpoint in DeepSpeed's universal (world-size-free) format,
                        made when a run resumed it on another number of ranks (trainer/checkpointing/reshard.py);
                        its own COMPLETE manifest; removed with the checkpoint

What each failure leaves behind:
- Killed mid-save: `latest` moves only after every rank has written everything and COMPLETE is on
  disk, so the rerun resumes from the previous checkpoint; it removes the directory without COMPLETE.
- A damaged file (truncated, corrupted, deleted): resume checks the manifest (every rank hashes a
  share of the files) and names the file; with trainer.resume.fallback=true the damaged checkpoint
  is moved aside (damaged_step_*) and the previous complete one is resumed.
- Disk full: a save that cannot fit (judged by the previous checkpoint's size) stops before writing
  anything; one that fails mid-write stops naming the error and the free space. `latest` is untouched.
- Another world size: the checkpoint is converted once to the universal format and each rank loads
  its new slice of it (trainer/checkpointing/reshard.py); weights, Adam's moments, the schedule, the counters and
  EWC's state go on exactly, with the global batch kept. A kill during the conversion leaves only
  universal/<tag>.tmp (and .sync), removed at the next start. With trainer.resume.elastic=false, resume stops
  before loading and says how to go on. Nothing ever restarts from scratch when a checkpoint exists.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from trainer import distributed, faults
from trainer.checkpointing import reshard
from trainer.checkpointing.manifest import digest
from trainer.components import Component

log = logging.getLogger("trainer")
GB = 1e9


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or resumed; the message says what to do."""


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps completed; also the data position (see data_pipeline/loader.py)."""
    tokens_seen: int = 0
    """Non-padding tokens trained on, all ranks."""
    supervised_tokens_seen: int = 0
    """Tokens that carried a loss, all ranks."""
    skipped_steps: int = 0
    """Steps whose update was skipped for a non-finite loss or gradient (trainer.failure.on_nonfinite=skip)."""
    baseline: Dict[str, float] = field(default_factory=dict)
    """Eval metrics of the model at step 0, the reference for eval/forgetting and eval/domain_gain."""
    world_size: int = 0
    micro_batch_size: int = 0
    grad_accum_steps: int = 0
    """The layout the steps were trained with (0: a checkpoint written before it was recorded)."""
    data_origin: List[int] = field(default_factory=lambda: [0, 0])
    """[step, row]: the row of the data stream that step `step` starts at; the stream position of
    step s is row + (s - step) x global batch. Moves only when a resume accepts a new global batch."""
    frozen: List[str] = field(default_factory=list)
    """The parameters trained frozen (regularizer.freeze); a resume must freeze the same ones."""

    def layout(self) -> Optional["reshard.Layout"]:
        return (
            reshard.Layout(self.world_size, self.micro_batch_size, self.grad_accum_steps) if self.world_size else None
        )


def frozen_parameters(engine) -> List[str]:
    """Names of the engine's parameters that do not train (regularizer.freeze)."""
    return [n for n, p in engine.module.named_parameters() if not p.requires_grad]


def _frozen_mismatch(path: Path, saved: List[str], now: List[str]) -> str:
    def tensors(names: List[str]) -> str:
        return f"{len(names)} tensors" + (f" ({names[0]} ... {names[-1]})" if names else "")

    return (
        f"{path} was trained with {tensors(saved)} frozen and this run freezes {tensors(now)}: a resume keeps what "
        "the run froze (DeepSpeed holds optimizer state only for the trained ones). Set regularizer.freeze as the "
        f"run that saved it had it, or start a new stage from its weights: `python launch/export.py {path} "
        "<model dir>`, then model.name_or_path=<model dir>, the new regularizer.freeze and a new output_dir."
    )


class Checkpointer(Component):
    """Saves at its cadence after a step and once more when the run stops early (a component of the
    loop); `resume(engine)` restores a run and binds the engine it saves from then on."""

    def __init__(
        self,
        output_dir: str,
        keep_last: int,
        rank: int,
        world_size: int,
        fallback: bool = False,
        tokenizer=None,
        extras: Optional[Dict[str, Any]] = None,
        every_steps: int = 0,
        elastic: bool = True,
    ) -> None:
        """every_steps: `maybe_save` saves every this many steps (0: only at the end).
        fallback: resume from the previous complete checkpoint when the latest is damaged.
        tokenizer: saved with the model's config in each checkpoint's model/ (for launch/export.py).
        extras: name -> object with state_dict()/load_state_dict(), saved per rank as <name>_rank<R>.pt
        (e.g. EWC's Fisher and anchor shards) and restored on resume; on another world size through
        its load_resharded(states of the old ranks, world, rank).
        elastic: resume a checkpoint saved by another number of ranks (trainer/checkpointing/reshard.py); False:
        stop, saying how to go on."""
        self.dir = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.world = world_size
        self.fallback = fallback
        self.tokenizer = tokenizer
        self.extras = extras or {}
        self.every_steps = every_steps
        self.elastic = elastic
        self.saved_step: Optional[int] = None  # the step of this process's last save
        self.engine = None  # bound by resume()

    def after_step(self, state: "TrainState", tracker, last: bool) -> None:
        self.maybe_save(self.engine, state, last)

    def on_stop(self, state: "TrainState") -> None:
        self.save_if_unsaved(self.engine, state)

    def maybe_save(self, engine, state: "TrainState", last: bool) -> None:
        """Save at the cadence (every_steps, and the run's last step). Collective."""
        if last or (self.every_steps and state.step % self.every_steps == 0):
            self.save(engine, state)

    def save_if_unsaved(self, engine, state: "TrainState") -> None:
        """Save this step unless the cadence just did (an early stop keeps exactly one checkpoint of it)."""
        if self.saved_step != state.step:
            self.save(engine, state)

    def latest_tag(self) -> Optional[str]:
        latest = self.dir / "latest"
        return latest.read_text().strip() if latest.is_file() else None

    # -- save ---------------------------------------------------------------------------------
    def save(self, engine, state: TrainState) -> None:
        tag = f"step_{state.step:08d}"
        self._make_room(tag)
        try:
            engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False)
            torch.save(_rng_state(), self.dir / tag / f"rng_rank{self.rank}.pt")
            for name, obj in self.extras.items():
                torch.save(obj.state_dict(), self.dir / tag / f"{name}_rank{self.rank}.pt")
            if self.rank == 0:
                state.frozen = frozen_parameters(engine)
                (self.dir / tag / "trainer_state.json").write_text(json.dumps(asdict(state)))
                engine.module.config.save_pretrained(self.dir / tag / "model")
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(self.dir / tag / "model")
            faults.kill_in_save(state.step, self.rank)
        except Exception as ex:  # ENOSPC and friends (torch.save reports them as RuntimeError)
            raise CheckpointError(self._save_failed(tag, ex)) from ex
        distributed.barrier()  # every shard and every rank's files are on disk
        manifest = self._hash_files(tag, sorted(self._files(tag)))
        if self.rank == 0:
            (self.dir / tag / "COMPLETE").write_text(json.dumps({"files": manifest}, indent=1))
            tmp = self.dir / "latest.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.dir / "latest")
            self._prune(keep=tag)
        distributed.barrier()
        self.saved_step = state.step
        log.info("saved checkpoint %s", self.dir / tag)

    def _make_room(self, tag: str) -> None:
        """Remove a stale directory under this tag (a later save of a run that resumed from an earlier
        checkpoint), and refuse to start a save that cannot fit: every rank checks its filesystem."""
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if (self.dir / tag).exists():
                log.warning("replacing %s, left by an earlier attempt that got further", self.dir / tag)
                shutil.rmtree(self.dir / tag)
        distributed.barrier()
        latest = self.latest_tag()
        need = _manifest_bytes(self.dir / latest) if latest else 0
        free = shutil.disk_usage(self.dir).free
        short = torch.tensor([1.0 if need and free < 1.05 * need else 0.0], dtype=torch.float64)
        if distributed.all_reduce_sum(short).item() > 0:
            raise CheckpointError(
                f"not enough space for checkpoint {tag} in {self.dir}: about {need / GB:.3f} GB needed (the size of "
                f"{latest}), {free / GB:.3f} GB free{'' if free < 1.05 * need else ' here, less on another rank'}. "
                f"Nothing was written; checkpoints/latest still points at {latest}, which is intact. Free space "
                "(or move output_dir), then rerun the same command to resume from it."
            )

    def _save_failed(self, tag: str, ex: Exception) -> str:
        free = shutil.disk_usage(self.dir).free if self.dir.exists() else 0
        latest = self.latest_tag()
        where = f"{latest}, which is intact" if latest else "nothing yet (this was the first save)"
        return (
            f"could not write checkpoint {self.dir / tag} on rank {self.rank}: {type(ex).__name__}: {ex}. "
            f"{free / GB:.3f} GB free there. checkpoints/latest still points at {where}; the partial {tag} is "
            "removed when the run starts again. Free space (or move output_dir), then rerun the same command."
        )

    def _prune(self, keep: str) -> None:
        complete = sorted(p for p in self.dir.glob("step_*") if (p / "COMPLETE").is_file())
        for old in complete[: -self.keep_last]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)
        for converted in self.dir.glob("universal/step_*"):  # a conversion goes with its checkpoint
            if not (self.dir / converted.name.split(".")[0]).is_dir():
                shutil.rmtree(converted, ignore_errors=True)

    # -- resume -------------------------------------------------------------------------------
    def resume(self, engine) -> TrainState:
        """Load the newest intact checkpoint into `engine`; a fresh TrainState only if there is none."""
        self.engine = engine
        self._remove_partial()
        tag = self._choose()
        if tag is None:
            return TrainState()
        path = self.dir / tag
        state = TrainState(**json.loads((path / "trainer_state.json").read_text()))
        saved_by = len(list(path.glob("*_optim_states.pt")))  # DeepSpeed writes one per rank
        if saved_by != self.world and not self.elastic:
            raise CheckpointError(
                f"{path} was saved by {saved_by} ranks and this run has {self.world}, and "
                "trainer.resume.elastic=false: "
                f"it resumes only on {saved_by} ranks (the same launcher flags or nodes x NPROC_PER_NODE). Leave "
                "trainer.resume.elastic on to reshard it to this world size (the optimizer state goes on), or start a "
                f"new run from its weights: `python launch/export.py {path} <model dir>` makes them a Hugging Face "
                "model, then run with model.name_or_path=<model dir> and a new output_dir (the optimizer state starts "
                "afresh)."
            )
        now = frozen_parameters(engine) if engine is not None else state.frozen
        if now != state.frozen:
            raise CheckpointError(_frozen_mismatch(path, state.frozen, now))
        for name in self.extras:
            missing = [f"{name}_rank{r}.pt" for r in range(saved_by) if not (path / f"{name}_rank{r}.pt").is_file()]
            if missing:
                raise CheckpointError(
                    f"{path / missing[0]} is missing: this run needs the {name} state saved with the "
                    "checkpoint (was it saved with another regularizer?)"
                )
        if saved_by != self.world:
            self._load_resharded(engine, path, saved_by)
        else:
            loaded, _ = engine.load_checkpoint(
                str(self.dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if loaded is None:
                raise CheckpointError(f"DeepSpeed could not load checkpoint {path}")
            for name, obj in self.extras.items():
                obj.load_state_dict(torch.load(path / f"{name}_rank{self.rank}.pt", weights_only=True))
        # A rank the checkpoint did not have takes rank 0's RNG (nothing in a step draws from it).
        rng_file = path / f"rng_rank{self.rank if self.rank < saved_by else 0}.pt"
        _set_rng_state(torch.load(rng_file, weights_only=True))
        log.info("resumed from %s at step %d", path, state.step)
        return state

    def _load_resharded(self, engine, path: Path, saved_by: int) -> None:
        """Checkpoint `path` of `saved_by` ranks into this world: through its universal conversion
        (made once, kept under universal/<tag>), and each extra re-cut from every old rank's file."""
        started = time.perf_counter()
        log.info("reshard: %s was saved by %d ranks and this run has %d; resharding it", path, saved_by, self.world)
        universal = reshard.ensure_universal(self, path.name, saved_by)
        converted = time.perf_counter()
        reshard.load_universal(engine, universal)
        for name, obj in self.extras.items():
            # mmap: each rank reads only the pages of the slices it keeps.
            states = [torch.load(path / f"{name}_rank{r}.pt", weights_only=True, mmap=True) for r in range(saved_by)]
            obj.load_resharded(states, self.world, self.rank)
        log.info(
            "reshard: %s from %d to %d ranks in %.1f s (conversion %.1f s, loading %.1f s)",
            path.name,
            saved_by,
            self.world,
            time.perf_counter() - started,
            converted - started,
            time.perf_counter() - converted,
        )

    def _remove_partial(self) -> None:
        """Directories without COMPLETE are saves that never finished (killed, disk full): not resumable;
        universal/<tag>.tmp (.sync) is a conversion that never finished."""
        if self.rank == 0 and self.dir.is_dir():
            latest = self.latest_tag()
            for path in sorted(self.dir.glob("step_*")):
                if path.is_dir() and not (path / "COMPLETE").is_file() and path.name != latest:
                    log.warning("removing %s: a checkpoint save that did not finish (no COMPLETE)", path)
                    shutil.rmtree(path, ignore_errors=True)
            for path in sorted([*self.dir.glob("universal/*.tmp"), *self.dir.glob("universal/*.sync")]):
                log.warning("removing %s: a conversion for another world size that did not finish", path)
                shutil.rmtree(path, ignore_errors=True)
        distributed.barrier()

    def _choose(self) -> Optional[str]:
        """The latest checkpoint if intact; with fallback, the newest intact one before it."""
        latest = self.latest_tag()
        complete = sorted((p.name for p in self.dir.glob("step_*") if (p / "COMPLETE").is_file()), reverse=True)
        if latest is None:
            if complete:  # `latest` deleted by hand: never silently start over
                raise CheckpointError(
                    f"{self.dir} holds {complete[0]} but no `latest` file; write the tag to resume "
                    f"from into {self.dir / 'latest'}, or delete {self.dir} to start over"
                )
            return None
        candidates = [latest] + [t for t in complete if t < latest]
        for i, tag in enumerate(candidates):
            problems = self.verify(tag)
            if not problems:
                if i > 0 and self.rank == 0:
                    (self.dir / "latest").write_text(tag)
                return tag
            report = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            previous = candidates[i + 1] if i + 1 < len(candidates) else None
            if not self.fallback:
                raise CheckpointError(
                    f"checkpoint {self.dir / tag} is damaged: {report}. Restore the file(s), or rerun with "
                    f"trainer.resume.fallback=true to resume from the previous complete checkpoint "
                    f"({previous or 'there is none'})."
                )
            log.warning("checkpoint %s is damaged (%s); falling back to %s", self.dir / tag, report, previous)
            distributed.barrier()  # every rank has read it before it moves
            if self.rank == 0:
                os.replace(self.dir / tag, self.dir / f"damaged_{tag}")
        raise CheckpointError(
            f"no intact checkpoint in {self.dir} (every one is damaged, see above); delete {self.dir} to start over"
        )

    def verify(self, tag: str) -> List[str]:
        """Problems with checkpoint `tag` against its manifest (collective: each rank hashes a share)."""
        path = self.dir / tag
        try:
            complete = json.loads((path / "COMPLETE").read_text() or "{}")
        except (OSError, ValueError) as ex:
            return [f"{path / 'COMPLETE'} is unreadable ({ex})"]
        expected = complete.get("files")
        if expected is None:
            log.warning("%s has no manifest (saved by an older version): not verified", path)
            return []
        names = sorted(expected)
        actual = self._hash_files(tag, [n for n in names if (path / n).is_file()])
        problems = []
        for name in names:
            if name not in actual:
                problems.append(f"{path / name} is missing")
            elif actual[name][0] != expected[name][0]:
                problems.append(
                    f"{path / name} is {actual[name][0]} bytes, {expected[name][0]} were written (truncated?)"
                )
            elif actual[name][1] != expected[name][1]:
                problems.append(f"{path / name} fails its CRC-32 check (corrupted)")
        return problems

    def _files(self, tag: str) -> List[str]:
        path = self.dir / tag
        return [str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != "COMPLETE"]

    def _hash_files(self, tag: str, names: List[str]) -> Dict[str, List[int]]:
        """{file: [size, crc32]} for `names`, each rank hashing every world-th one; the same on all ranks."""
        mine = {n: digest(self.dir / tag / n) for n in names[self.rank :: self.world]}
        merged: Dict[str, List[int]] = {}
        for part in distributed.all_gather_object(mine):
            merged.update(part)
        return merged


def _manifest_bytes(path: Path) -> int:
    try:
        return sum(size for size, _ in json.loads((path / "COMPLETE").read_text())["files"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def finished_step(output_dir: str, max_steps: int, export_hf: bool) -> Optional[int]:
    """The step of a run that output_dir holds finished (its latest checkpoint, COMPLETE, at
    max_steps or later, and the Hugging Face export when one is asked for), else None. Read from
    files alone, so a finished stage is skipped before anything is built: no ranks, data or model."""
    out = Path(output_dir)
    latest = out / "checkpoints" / "latest"
    try:
        tag = latest.read_text().strip()
        step = json.loads((latest.parent / tag / "trainer_state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None
    if not (latest.parent / tag / "COMPLETE").is_file() or step < max_steps:
        return None
    if export_hf and not (out / "hf" / "config.json").is_file():
        return None
    return step


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
