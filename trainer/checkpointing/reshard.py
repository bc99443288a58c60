"""Elastic resume: continue a checkpoint saved by another number of ranks, with everything intact.
The batch arithmetic is layout.py; this module converts and loads.

ZeRO-3 keeps one shard of the fp32 weights and of Adam's moments per rank, cut for the world size
that saved them. When the latest checkpoint was saved by W ranks and the run has W' != W:

1. The global batch is kept (`resolve_batch`, before the engine is built): B = micro x accum x
   world is the checkpoint's, so the data position (= the step, data_pipeline/loader.py), the
   schedule and the gradient noise go on as they were. grad_accum_steps left unset is derived for
   W'; a fixed one that cannot keep B stops naming the settings that would, or the override
   (trainer.resume.allow_new_global_batch=true) that accepts a new B from this step on.
2. The checkpoint is converted once to DeepSpeed's universal format (`ensure_universal`): one
   file per parameter and state (fp32, exp_avg, exp_avg_sq), independent of the world size,
   under checkpoints/universal/<tag>/. Every rank of the new run takes a share of the work
   (DeepSpeed's two passes: extracting each old shard's per-parameter fragments, then merging
   each parameter's), signalling the others through files in <tag>.sync/ rather than collectives,
   which would time out on a large model. It is built in <tag>.tmp/ and renamed only once its
   manifest (COMPLETE, the checkpoints' own protocol) is written, so a kill during the conversion
   leaves the checkpoint itself untouched and the next start converts again; a damaged or stale
   conversion (the manifest, or the source it was made from, does not match) is redone. The
   conversion is kept for the next reshard from the same checkpoint, and pruned with it.
3. Each rank loads its new slice from it (`load_universal`): pure narrow/concatenate, so the fp32
   weights, both moments and the step count are bit for bit the checkpoint's; DeepSpeed restores
   the LR schedule and its counters from the model-state file. Two things DeepSpeed 0.19.8's
   ZeRO-3 universal loader gets wrong are put right after it: it gives every optimizer sub-group
   one shared `step` tensor (Adam then counts each step once per sub-group) and copies the first
   param group's hyper-parameters into every group (weight decay on the no-decay group).
4. Per-rank extras (EWC's Fisher and anchor) are re-cut the same way (`repartition`), so the EWC
   penalty after the reshard equals the penalty before it.

The losses after a reshard match an uninterrupted run of the same global batch to fp32 rounding
(another world size sums the gradients in another order), not bit for bit; the state at the
reshard point is exact.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Callable, Dict, Optional

from data_pipeline import filesync
from trainer import distributed, faults
from trainer.checkpointing import deepspeed_patches
from trainer.checkpointing.layout import (  # noqa: F401  (the layout's names, for the resharder's users)
    Layout,
    ReshardError,
    partition,
    repartition,
    resolve_batch,
    saved_layout,
)
from trainer.checkpointing.manifest import digest

log = logging.getLogger("trainer")

FORMAT = 1
"""Version of the conversion's layout (source.json); a conversion of another version is redone."""
HEARTBEAT_S = 10.0
"""How often the converting rank touches its heartbeat file while DeepSpeed converts."""
STALL_S = 600.0
"""The other ranks give up when the heartbeat is older than this (the converting rank died
without the launcher ending the job): there is no limit on a conversion that is alive."""


# ---- the universal conversion ------------------------------------------------------------------------


def source_id(ckpt_dir: Path, tag: str) -> int:
    """The identity of checkpoint `tag`: the CRC-32 of its manifest (every file's size and CRC)."""
    return zlib.crc32((ckpt_dir / tag / "COMPLETE").read_bytes())


def ensure_universal(checkpointer, tag: str, saved_by: int) -> Path:
    """checkpoints/universal/<tag>, made from checkpoint `tag` unless an intact conversion of it is
    there. Collective: the ranks of this run share the conversion's work and wait for each other on
    the filesystem (a conversion can take longer than any collective timeout)."""
    root = checkpointer.dir / "universal"
    rel = f"universal/{tag}"
    final = root / tag
    wanted = source_id(checkpointer.dir, tag)
    if (final / "COMPLETE").is_file():
        problems = checkpointer.verify(rel)
        if not problems:
            made_from = _read_json(final / "source.json")
            if made_from.get("source_id") != wanted or made_from.get("format") != FORMAT:
                problems = [f"it was made from another {tag} (or by another version): {made_from or 'no source.json'}"]
        if not problems:
            log.info("reshard: reusing the universal conversion %s of %s (saved by %d ranks)", final, tag, saved_by)
            return final
        log.warning(
            "reshard: the universal conversion %s is not usable (%s); converting %s again",
            final,
            "; ".join(problems[:3]),
            tag,
        )
        distributed.barrier()  # every rank has looked before it goes
        if checkpointer.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
    # The conversion is built in <tag>.tmp; the ranks signal each other through files in <tag>.sync
    # (heartbeats, finished passes, failures). Rank 0 clears both and checks the disk; every rank
    # hears the verdict.
    tmp, sync = root / f"{tag}.tmp", root / f"{tag}.sync"
    refusal = None
    if checkpointer.rank == 0:
        for work in (tmp, sync):
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
        refusal = _no_room(checkpointer.dir / tag, root)
    refusal = distributed.all_gather_object(refusal)[0]
    if refusal:
        raise ReshardError(refusal)
    with filesync.heartbeat(sync / f"HEARTBEAT.{checkpointer.rank}", HEARTBEAT_S):
        try:
            _convert(checkpointer.dir / tag, tmp, sync, final, wanted, saved_by, checkpointer.rank, checkpointer.world)
        except BaseException as ex:
            with contextlib.suppress(OSError):
                (sync / f"FAILED.{checkpointer.rank}").write_text(f"{type(ex).__name__}: {ex}")
            raise
    distributed.barrier()
    if checkpointer.rank == 0:
        shutil.rmtree(sync, ignore_errors=True)
    return final


def _no_room(source: Path, root: Path) -> Optional[str]:
    """Why the conversion cannot fit, or None. It holds the optimizer state once more (fp32 weights and
    both moments), and DeepSpeed's fragments of it for a while: refuse before writing, not mid-way."""
    need = 2 * sum(p.stat().st_size for p in source.glob("*_optim_states.pt"))
    free = shutil.disk_usage(root).free
    if free >= need:
        return None
    return (
        f"not enough space to convert {source} for another world size in {root}: about {need / 1e9:.3f} GB "
        f"needed (twice its optimizer shards), {free / 1e9:.3f} GB free. Free space, then rerun the same command; "
        "the checkpoint is intact"
    )


def _convert(
    source: Path, tmp: Path, sync: Path, final: Path, wanted: int, saved_by: int, rank: int, world: int
) -> None:
    """DeepSpeed's ZeRO-3 universal conversion (deepspeed.checkpoint.ds_to_universal), its two passes
    split over this run's ranks: each extracts the per-parameter fragments of the old ranks
    rank, rank + world, ...; then each merges every world-th parameter's fragments into its
    universal files; rank 0 writes the common state, the manifest, and renames tmp to final."""
    from deepspeed import __version__ as ds_version
    from deepspeed.checkpoint import ds_to_universal as uc

    started = time.perf_counter()
    fragments, zero = tmp / "fragments", tmp / "zero"
    try:
        if rank == 0:
            log.info(
                "reshard: converting %s (saved by %d ranks) to DeepSpeed's universal format in %s, split over %d ranks",
                source,
                saved_by,
                final,
                world,
            )
        optim_files = uc._filter_zero3_optim_files(uc._get_optim_files(str(source)))
        model_files = uc._get_zero3_model_state_files(str(source))
        optim_grid, tp_degree, dp_degree = uc._build_zero3_rank_grid(optim_files)
        _, model_tp, model_dp = uc._build_zero3_rank_grid(model_files)
        if (tp_degree, dp_degree, model_tp, model_dp) != (1, saved_by, 1, saved_by):
            raise ReshardError(
                f"{source}: {dp_degree} optimizer and {model_dp} model-state shards (tensor parallel "
                f"{tp_degree}); a data-parallel ZeRO-3 checkpoint of {saved_by} ranks was expected"
            )
        shapes = [uc._parse_model_states_stage3(model_files)]  # parameter name -> shape, per sub-group
        printed = io.StringIO()  # DeepSpeed's progress prints
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            for old_rank in range(rank, saved_by, world):
                uc.extract_zero_shards_stage3(optim_grid, shapes, saved_by, str(fragments), (0, old_rank))
            _done_and_wait(sync, "extract", rank, world)
            names = sorted({name for group in shapes[0] for name in group})
            for name in names[rank::world]:
                uc.merge_zero3_slices(saved_by, str(zero), str(fragments), name)
            _done_and_wait(sync, "merge", rank, world)
        faults.kill_in_reshard("convert", rank)
        if rank == 0:
            with contextlib.redirect_stdout(printed):
                uc._save_optimizer_state_stage3(argparse.Namespace(output_folder=str(tmp)), optim_files)
            for model_file in model_files:
                shutil.copy2(model_file, tmp)
            shutil.rmtree(fragments)
            deepspeed_patches.slim_optimizer_state(zero / "optimizer_state.pt")
            (tmp / "source.json").write_text(
                json.dumps(
                    {
                        "source": source.name,
                        "source_id": wanted,
                        "saved_by": saved_by,
                        "format": FORMAT,
                        "deepspeed": ds_version,
                        "converted_by": world,
                    },
                    indent=1,
                )
            )
            files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
            manifest = {name: digest(tmp / name) for name in files}
            (tmp / "COMPLETE").write_text(json.dumps({"files": manifest}, indent=1))
            faults.kill_in_reshard("finalize", 0)
            os.replace(tmp, final)
            size = sum(s for s, _ in manifest.values())
            log.info(
                "reshard: converted %s in %.1f s (%.3f GB)", source.name, time.perf_counter() - started, size / 1e9
            )
        else:
            _wait_for(final, sync, world)
    except BaseException as ex:
        if not isinstance(ex, Exception) or isinstance(ex, ReshardError):
            raise
        raise ReshardError(
            f"converting {source} to the universal format failed on rank {rank}: {type(ex).__name__}: "
            f"{ex}. The checkpoint itself is untouched; the partial {tmp} is removed and the conversion "
            "redone when the run starts again"
        ) from ex


def _done_and_wait(sync: Path, phase: str, rank: int, world: int) -> None:
    (sync / f"{phase}.{rank}").write_text("")
    _wait(
        sync,
        world,
        lambda: all((sync / f"{phase}.{r}").exists() for r in range(world)),
        f"the other ranks' part of the conversion ({phase})",
    )


def _wait_for(final: Path, sync: Path, world: int) -> None:
    """Until rank 0 has renamed the finished conversion into place."""
    _wait(sync, world, lambda: (final / "COMPLETE").is_file(), f"rank 0 to finish the conversion into {final}")


def _wait(sync: Path, world: int, ready: Callable[[], bool], what: str) -> None:
    """Poll until ready(); a rank's failure or a rank whose heartbeat stopped ends the wait."""
    heartbeats = filesync.HeartbeatWatch([sync / f"HEARTBEAT.{r}" for r in range(world)])

    def ranks_alive() -> None:
        failed = sorted(sync.glob("FAILED.*"))
        if failed:
            raise ReshardError(
                f"waited for {what}, but rank {failed[0].suffix[1:]} failed: {failed[0].read_text()}; "
                "see that rank's log"
            )
        stalled = heartbeats.stalled(STALL_S)
        if stalled and not ready():  # it may have finished, and stopped beating, since the last poll
            raise ReshardError(
                f"waited for {what}, but rank {stalled[0].suffix[1:]}'s heartbeat ({stalled[0]}) "
                f"stopped more than {STALL_S:.0f} s ago; see its log"
            )

    filesync.wait_until(ready, poll_s=0.2, check=ranks_alive)


def _read_json(path: Path) -> Dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ---- loading it --------------------------------------------------------------------------------------


def load_universal(engine, universal: Path) -> None:
    """Load the universal conversion `universal` (checkpoints/universal/<tag>) into a ZeRO-3 engine of
    any world size: weights, Adam's moments and step, the LR schedule and DeepSpeed's counters."""
    config = engine._config
    previous = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        with deepspeed_patches.mapped_parameter_files():
            loaded, _ = engine.load_checkpoint(
                str(universal.parent), tag=universal.name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
    finally:
        config.load_universal_checkpoint = previous
    if loaded is None:
        raise ReshardError(f"DeepSpeed could not load the universal checkpoint {universal}")
    deepspeed_patches.fix_optimizer_after_universal_load(engine.optimizer, universal / "zero" / "optimizer_state.pt")
