"""Who this process is, for every launcher: deepspeed, torchrun, srun and plain python.

Launchers disagree on how they say it. deepspeed and torchrun set RANK/WORLD_SIZE/LOCAL_RANK
(deepspeed also passes --local_rank=N, newer launchers --local-rank=N); srun alone sets
SLURM_PROCID/SLURM_LOCALID/SLURM_STEP_NUM_TASKS; plain python sets nothing and is world size 1.
`setup_environment` maps all of them onto torch.distributed's environment variables; `cpu_threads`
shares a node's cores among its ranks.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from typing import List

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
        nodes = subprocess.run(
            ["scontrol", "show", "hostnames", env["SLURM_STEP_NODELIST"]], capture_output=True, text=True, check=True
        ).stdout.split()
        env["MASTER_ADDR"] = nodes[0]
    # A port every task derives alike from the job id, away from the ephemeral range.
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def setup_environment() -> None:
    """RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT set for torch.distributed, whichever launcher
    (or none) started this process."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        _env_from_slurm()
    if "RANK" not in env:  # plain `python launch/train.py`
        env.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=env.get("MASTER_PORT", str(free_port())),
        )
    env.setdefault("LOCAL_RANK", "0")


def local_world_size() -> int:
    env = os.environ
    return int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or 1)


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
