"""Helpers every tier shares: launch the real entry point the way a user would, and read what it
wrote. (Fixtures live in conftest.py; this module is importable as `helpers` from any test
directory: pyproject's pytest `pythonpath` puts tests/ on sys.path.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

from trainer.distributed import free_port
from trainer.observability.tracking import read_metrics, series  # noqa: F401  (re-exported: the one metrics reader)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Small, quick runs: the embedded tiny model on the bundled medical QA pairs. No generations at the
# evals (each costs a collective forward per new token: ~6 s an eval here) and no PNG dashboard at
# the end (~3 s of matplotlib); the tests that check them (distributed/test_wandb.py,
# distributed/test_recipe.py, the dashboard's unit tests) keep them.
QUICK = ["+exp=medical_qa", "logger=jsonl", "trainer.log_every_steps=1", "trainer.warmup_steps=5",
         "eval.sample_prompts=[]", "logger.dashboard=false"]

# The launcher of runs where it is incidental: torchrun starts one agent process, the deepspeed
# launcher two (its runner, then deepspeed.launcher.launch), each importing torch and deepspeed
# first. The deepspeed launcher keeps the reference run, the kill tests and the launcher tests.
LAUNCHER = "torchrun"

# The reference run of the distributed tiers: 20 steps of 2 ranks x micro 2 x accumulation 2 (8 rows
# a step, 55 packed rows in the set: three epochs), saved every 5 steps.
STRAIGHT = QUICK + ["trainer.max_steps=20", "trainer.micro_batch_size=2", "trainer.grad_accum_steps=2",
                    "trainer.save_every_steps=5", "trainer.eval_every_steps=10"]

# One rank (plain `python`), micro-batch 8: the same 8 rows per step as STRAIGHT's 2 ranks x 2 x 2.
ONE_RANK = QUICK + ["trainer.max_steps=2", "trainer.micro_batch_size=8", "trainer.export_hf=false"]

# Every rank of every launched run computes with one intra-op thread (trainer/distributed.py honours
# OMP_NUM_THREADS): runs on 1 rank, 2 ranks or 2 nodes then split their sums alike, whatever the
# machine's core count, so the tests can compare them bit for bit where the rows are the same.
THREADS = {"OMP_NUM_THREADS": "1"}


def launcher_cmd(launcher: str, nproc: int = 2) -> List[str]:
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), "launch/train.py"]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
                "launch/train.py"]
    return [sys.executable, "launch/train.py"]


def run_train(launcher: str, overrides: List[str], nproc: int = 2, timeout: int = 600, env: Dict[str, str] = None,
              **kw) -> subprocess.CompletedProcess:
    """The entry point under `launcher`; `env`: extra environment variables (e.g. fault injection)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", **THREADS, **(env or {})}
    return subprocess.run(launcher_cmd(launcher, nproc) + overrides, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def shm_buffers_left(args: List[str]) -> List[str]:
    """DeepSpeed CPU all-reduce buffers still in /dev/shm for the run launched with `args` (its
    --master_port): the trainer unlinks them once every rank has mapped them, killed runs included."""
    port = args[args.index("--master_port") + 1]
    return sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
