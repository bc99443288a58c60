"""Distributed plumbing, one job a module: `launcher` (who this process is, under deepspeed,
torchrun, srun or plain python; CPU threads per rank), `group` (the process group, the trainer's
own collectives, and a clean end of the process), `ops` (DeepSpeed workarounds on CPU).
The process-group API is re-exported here: `distributed.all_reduce_sum(...)`."""

from trainer.distributed.group import (  # noqa: F401
    DistInfo,
    all_gather_object,
    all_reduce_sum,
    barrier,
    finish,
    held,
    init,
    local_rank_zero_first,
    rank,
    shutdown,
    world_size,
)
from trainer.distributed.launcher import env_rank, free_port, strip_launcher_args  # noqa: F401
