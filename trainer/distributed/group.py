"""The process group: started once per process through DeepSpeed (NCCL on GPUs, gloo on CPU) with a
collective timeout, so a dead peer turns into an error instead of a hang; the few collectives the
trainer calls itself; and the end of the process (`finish`).

Why `finish` ends the process with os._exit: DeepSpeed's engine stays referenced from C++ autograd
hooks after a run, and with it the gloo process groups it holds, so their worker threads
(`pt_gloo_runloop`) outlive destroy_process_group. When such a thread drops the last reference to
a finished work's tensor while the interpreter is finalising, it must take the GIL, Python ends
the thread (pthread_exit) inside a noexcept C++ frame, and the process aborts: "terminate called
without an active exception", exit -6, after a run that trained and exported. Whether a thread
is still holding such a tensor at that moment depends on timing: it happened under CPU load
(tests/distributed/test_teardown.py provokes it). `finish` flushes everything the process wrote
and leaves without interpreter finalisation, so no C++ thread can meet a dying interpreter.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from dataclasses import dataclass

from trainer.distributed import launcher, ops

log = logging.getLogger("trainer")


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

    launcher.setup_environment()
    env = os.environ
    on_gpu = torch.cuda.is_available()
    local_world = launcher.local_world_size()
    if on_gpu:
        torch.cuda.set_device(int(env["LOCAL_RANK"]))
        env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    else:
        torch.set_num_threads(launcher.cpu_threads(env, os.cpu_count() or 1, local_world))
        ops.warn_stale_op_build_lock()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    ops.release_shm_buffer()
    _INFO = DistInfo(
        rank=int(env["RANK"]),
        local_rank=int(env["LOCAL_RANK"]),
        world_size=int(env["WORLD_SIZE"]),
        local_world_size=local_world,
        on_gpu=on_gpu,
    )
    return _INFO


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


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


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
    """Leave the process group cleanly (collective): every rank reaches the barrier, then DeepSpeed's
    destroy_process_group waits for pending work, shuts every backend down and drops DeepSpeed's own
    references to the groups. Inside `held()` (a recipe's stages) it does nothing."""
    import torch.distributed as dist

    global _INFO
    if _HELD:
        return
    _INFO = None
    if dist.is_initialized():
        dist.barrier()
        import deepspeed.comm

        if deepspeed.comm.is_initialized():
            deepspeed.comm.destroy_process_group()
        else:
            dist.destroy_process_group()


def finish(status: int) -> None:
    """End this process with `status` once its work is written: logs and standard streams
    flushed, then os._exit, skipping interpreter finalisation (see the module docstring for why).
    Call last, after shutdown(); files the run writes are closed by their owners before this
    (the tracker, checkpoints, the export)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)
