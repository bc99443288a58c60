"""Process-group setup for every launcher: deepspeed, torchrun, srun and plain python.

Launchers disagree on how they say who a process is. deepspeed and torchrun set RANK/WORLD_SIZE/
LOCAL_RANK (deepspeed also passes --local_rank=N, newer launchers --local-rank=N); srun alone sets
SLURM_PROCID/SLURM_LOCALID/SLURM_STEP_NUM_TASKS; plain python sets nothing and is world size 1.
`init` maps all of them onto the torch.distributed environment variables, then starts DeepSpeed's
communication backend (NCCL on GPUs, gloo on CPU) with a collective timeout, so a dead peer turns
into an error instead of a hang.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

log = logging.getLogger("trainer")

_LAUNCHER_ARG = re.compile(r"^--local[-_]rank(=\d+)?$")


def strip_launcher_args(argv: List[str]) -> List[str]:
    """Drop --local_rank=N / --local-rank=N (and a separate value after them) so Hydra sees only
    overrides. The rank itself is read from the environment."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if _LAUNCHER_ARG.match(arg):
            if "=" not in arg:
                local_rank = argv[i + 1] if i + 1 < len(argv) else "0"
                os.environ.setdefault("LOCAL_RANK", local_rank)
                skip = True
            else:
                os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            continue
        out.append(arg)
    return out


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    on_gpu: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_rank() -> int:
    """This process's global rank as its launcher gave it (torchrun/deepspeed: RANK; srun: SLURM_PROCID;
    plain python: 0), before, or without, a process group."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"])
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        return int(env["SLURM_PROCID"])
    return 0


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous that starts right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_from_slurm() -> None:
    """srun without torchrun: one task per process, rank from SLURM_PROCID."""
    env = os.environ
    env["RANK"] = env["SLURM_PROCID"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env["WORLD_SIZE"] = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))
    env.setdefault("LOCAL_WORLD_SIZE", env.get("SLURM_STEP_TASKS_PER_NODE", "1").split("(")[0].split(",")[0])
    if "MASTER_ADDR" not in env:
        nodes = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_STEP_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        env["MASTER_ADDR"] = nodes[0]
    # A port every task derives alike from the job id, away from the ephemeral range.
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


STALE_LOCK_S = 600  # a CPU op builds in ~90 s on 2 cores; a lock this old was left by a killed build


def warn_stale_op_build_lock(now: Optional[float] = None) -> Optional[str]:
    """On CPU, DeepSpeed JIT-builds its shared-memory all-reduce op at init under a lock file in
    TORCH_EXTENSIONS_DIR. A process killed mid-build leaves the lock behind, and every later run
    waits on it forever, silently. Name it instead (returns the path when it looks stale)."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "lock"
    try:
        age = (now or time.time()) - lock.stat().st_mtime
    except OSError:
        return None
    if age < STALE_LOCK_S:
        return None
    log.warning("%s is %.0f minutes old: DeepSpeed waits on it before building its CPU communication op. "
                "If no other process is building that op now, a killed build left it: delete the file, or "
                "this run waits forever.", lock, age / 60)
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


def cpu_threads(env, cpu_count: int, local_world_size: int) -> int:
    """Intra-op threads of a CPU rank: OMP_NUM_THREADS when the user (or a launcher) set it, else
    the node's cores shared out among its ranks (oversubscribed threads make every rank slower).
    An explicit setting matters beyond speed: a float sum split over another number of threads
    can differ in its last bits, so two runs compute identically only with the same thread count.

    >>> cpu_threads({"OMP_NUM_THREADS": "1"}, 16, 2), cpu_threads({}, 16, 2), cpu_threads({}, 2, 4)
    (1, 8, 1)
    """
    given = str(env.get("OMP_NUM_THREADS", "")).strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    return max(1, cpu_count // max(1, local_world_size))


_INFO = None  # the process group of this process, once initialised
_HELD = False  # a recipe keeps one process group across its stages


def init(timeout_s: int) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed for whichever launcher started us (once per
    process: a second call, e.g. the next stage of a recipe, returns the same group)."""
    import deepspeed
    import torch
    import torch.distributed as tdist

    global _INFO
    if _INFO is not None and tdist.is_initialized():
        return _INFO

    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        _env_from_slurm()
    if "RANK" not in env:  # plain `python launch/train.py`
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=env.get("MASTER_PORT", str(free_port())))
    env.setdefault("LOCAL_RANK", "0")
    on_gpu = torch.cuda.is_available()
    local_world = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or 1)
    if on_gpu:
        torch.cuda.set_device(int(env["LOCAL_RANK"]))
        env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    else:
        torch.set_num_threads(cpu_threads(env, os.cpu_count() or 1, local_world))
        warn_stale_op_build_lock()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo",
                               timeout=datetime.timedelta(seconds=timeout_s))
    release_shm_buffer()
    _INFO = DistInfo(rank=int(env["RANK"]), local_rank=int(env["LOCAL_RANK"]), world_size=int(env["WORLD_SIZE"]),
                     local_world_size=local_world, on_gpu=on_gpu)
    return _INFO


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
    mine = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
            f"{env.get('MASTER_PORT', '')}_{tdist.get_rank()}")
    if tdist.get_world_size() > 1:
        tdist.barrier()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(mine)


def all_reduce_sum(values: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
    """Sum a small tensor over all ranks (in place) and return it. NCCL reduces only GPU tensors,
    so a CPU tensor makes a round trip through the current GPU there."""
    import torch
    import torch.distributed as dist

    if values.device.type == "cpu" and dist.get_backend() == "nccl":
        on_gpu = values.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
        values.copy_(on_gpu.cpu())
        return values
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_object(obj):
    """Every rank's `obj` (picklable, small), in rank order, on every rank."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


@contextlib.contextmanager
def local_rank_zero_first():
    """The body runs on each node's first process, then on the others (e.g. training a tokenizer
    that the others then load from the cache). Collective."""
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if first:
        yield
    barrier()
    if not first:
        yield


@contextlib.contextmanager
def held():
    """Keep the process group alive across several fit() calls (the stages of a recipe): a gloo or
    NCCL group destroyed and created again in one process can hang, so it is made once."""
    global _HELD
    _HELD = True
    try:
        yield
    finally:
        _HELD = False
        shutdown()


def shutdown() -> None:
    """Leave the process group cleanly; a gloo group left to interpreter exit can abort the process."""
    import torch.distributed as dist

    global _INFO
    if _HELD:
        return
    _INFO = None
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def setup_logging(rank: int) -> None:
    """Rank 0 logs INFO; other ranks only warnings and errors (no per-rank spam)."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", force=True)
    # DeepSpeed calls torch collectives that torch has renamed; the warning repeats every step.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use .*", category=FutureWarning)
    logging.getLogger("trainer.ranks").setLevel(logging.INFO)  # the few lines every rank must say
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


if __name__ == "__main__":  # python -m trainer.distributed build-ops
    import sys

    if sys.argv[1:] != ["build-ops"]:
        raise SystemExit("usage: python -m trainer.distributed build-ops   (builds DeepSpeed's CPU ops into "
                         "TORCH_EXTENSIONS_DIR once, as `make setup` does)")
    started = time.time()
    ready = build_cpu_ops()
    print(f"DeepSpeed CPU ops ready in {os.environ.get('TORCH_EXTENSIONS_DIR', '(torch default)')}: "
          f"{', '.join(ready) or 'none needed'} ({time.time() - started:.0f} s)")
