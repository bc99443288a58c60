"""Workarounds for DeepSpeed on this project's machines: its CPU ops built once instead of at every
first use (and the stale build lock a killed build leaves), its Muon optimizer imported without
compiling it, and its shared-memory all-reduce buffers unlinked as soon as every rank mapped them.
Each names the DeepSpeed version it was written against (0.19); re-check on an upgrade."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import List, Optional

from data_pipeline import filesync

log = logging.getLogger("trainer")

STALE_LOCK_S = 600  # a CPU op builds in ~90 s on 2 cores; a lock this old was left by a killed build


def warn_stale_op_build_lock(now: Optional[float] = None) -> Optional[str]:
    """On CPU, DeepSpeed JIT-builds its shared-memory all-reduce op at init under a lock file in
    TORCH_EXTENSIONS_DIR. A process killed mid-build leaves the lock behind, and every later run
    waits on it forever, silently. Name it instead (returns the path when it looks stale)."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "lock"
    age = filesync.age_s(lock, now)  # DeepSpeed's lock records no owner: its age is all there is to go by
    if age is None or age < STALE_LOCK_S:
        return None
    log.warning(
        "%s is %.0f minutes old: DeepSpeed waits on it before building its CPU communication op. "
        "If no other process is building that op now, a killed build left it: delete the file, or "
        "this run waits forever.",
        lock,
        age / 60,
    )
    return str(lock)


# DeepSpeed's CPU ops a run on CPU can JIT-build at first use (~90 s each on 2 cores): the shared-
# memory all-reduce at every init, cpu_adam with deepspeed=zero3_offload.
CPU_OPS = ("ShareMemCommBuilder", "CPUAdamBuilder")


def build_cpu_ops(names=CPU_OPS) -> List[str]:
    """Build DeepSpeed's CPU ops now, into TORCH_EXTENSIONS_DIR, as `make setup` does, so that no
    run pays for the build (or, killed during it, leaves the lock every later run waits on). A no-op
    when they are built already, and on a GPU accelerator (its ops come prebuilt or are CUDA's).
    Returns the ops that are ready."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return []
    ready = []
    for name in names:
        builder = get_accelerator().create_op_builder(name)
        if builder is not None and builder.is_compatible(verbose=False):
            builder.load(verbose=False)
            ready.append(builder.name)
    return ready


MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def import_muon_uncompiled() -> None:
    """DeepSpeed (0.19) imports its Muon optimizer whenever it builds a ZeRO engine, only to check
    that ours is not one, and that module wraps its kernels in torch.compile at import: 2.2 s per
    rank on a 2-core CPU, in every run, for an optimizer this trainer never builds. Import it once
    with torch.compile deferred to a wrapped function's first call (which never comes here; if it
    did, it would compile then, as DeepSpeed meant). Call before deepspeed.initialize."""
    import functools
    import importlib
    import sys

    import torch

    if MUON_MODULE in sys.modules:
        return
    compile_now = torch.compile

    def deferred(model=None, **options):
        def wrap(fn):
            compiled = None

            @functools.wraps(fn)
            def call(*args, **kwargs):
                nonlocal compiled
                if compiled is None:
                    compiled = compile_now(fn, **options)
                return compiled(*args, **kwargs)

            return call

        return wrap if model is None else wrap(model)

    torch.compile = deferred
    try:
        importlib.import_module(MUON_MODULE)
    except ImportError:  # a DeepSpeed without Muon: nothing to defer
        pass
    finally:
        torch.compile = compile_now


def release_shm_buffer() -> None:
    """Unlink this rank's DeepSpeed shared-memory all-reduce buffer (64 MiB, named by its shm comm
    op /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>) as soon as
    every rank has mapped it. On CPU, when all ranks share a host, DeepSpeed creates one such file
    per rank and never removes it: every run, finished or killed, left 64 MiB per rank of RAM
    behind (a test suite of short runs filled a 24 GiB machine's memory with them). Each rank
    maps every peer's buffer before init_distributed returns, so after one barrier the names can
    go: the mappings stay valid, and the kernel frees the memory when the last rank exits, however
    it exits. Call right after deepspeed.init_distributed (every rank, collectively)."""
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_backend() != "gloo":
        return
    env = os.environ
    mine = (
        f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
        f"{env.get('MASTER_PORT', '')}_{tdist.get_rank()}"
    )
    if tdist.get_world_size() > 1:
        tdist.barrier()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(mine)
