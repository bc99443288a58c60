"""Shared helpers: launch the real entry point the way a user would, and read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def launcher_cmd(launcher: str, nproc: int = 2) -> List[str]:
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(_port()), "launch/train.py"]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(_port()), "launch/train.py"]
    return [sys.executable, "launch/train.py"]


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Small, quick runs: the embedded tiny model on the bundled medical QA pairs.
QUICK = ["+exp=medical_qa", "logger=jsonl", "trainer.log_every_steps=1", "trainer.warmup_steps=5"]


# The reference run of the distributed tiers: 20 steps of 2 ranks x micro 2 x accumulation 2 (8 rows
# a step, 55 packed rows in the set: three epochs), saved every 5 steps.
STRAIGHT = QUICK + ["trainer.max_steps=20", "trainer.micro_batch_size=2", "trainer.grad_accum_steps=2",
                    "trainer.save_every_steps=5", "trainer.eval_every_steps=10"]


def run_train(launcher: str, overrides: List[str], nproc: int = 2, timeout: int = 600, env: Dict[str, str] = None,
              **kw) -> subprocess.CompletedProcess:
    """The entry point under `launcher`; `env`: extra environment variables (e.g. fault injection)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run(launcher_cmd(launcher, nproc) + overrides, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory):
    """STRAIGHT under `deepspeed`, W&B offline: the reference run of test_distributed and test_faults."""
    out = tmp_path_factory.mktemp("straight")
    proc = run_train("deepspeed", STRAIGHT + ["logger=wandb", f"output_dir={out}"])
    check(proc)
    return out, proc


def shm_buffers_left(args: List[str]) -> List[str]:
    """DeepSpeed CPU all-reduce buffers still in /dev/shm for the run launched with `args` (its
    --master_port): the trainer unlinks them once every rank has mapped them, killed runs included."""
    port = args[args.index("--master_port") + 1]
    return sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


@pytest.fixture(scope="session", autouse=True)
def no_shared_memory_left_behind():
    """The whole suite must not leave DeepSpeed shared-memory buffers behind (64 MiB of RAM each,
    until reboot): before the trainer unlinked them, one test session left ~9 GiB in /dev/shm and
    the machine slowed to a crawl."""
    before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    yield
    left = sorted(p.name for p in set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) - before)
    assert not left, f"{len(left)} DeepSpeed shm buffer(s) left in /dev/shm by this test session: {left[:10]}"


def read_metrics(output_dir: Path) -> List[Dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def series(rows: List[Dict], key: str) -> Dict[int, float]:
    return {r["step"]: r[key] for r in rows if key in r}


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tiny model's sentencepiece tokenizer, trained (or loaded from cache) as a run would."""
    from hydra import compose, initialize_config_dir

    from trainer.config import register_configs, to_config
    from trainer.tokenizer import load_tokenizer

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = to_config(compose(config_name="config", overrides=["+exp=medical"]))
    return load_tokenizer(cfg.model)
