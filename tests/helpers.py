"""Helpers every tier shares: launch the real entry point the way a user would, and read what it
wrote; and what more than one test file compares against (a tolerance, the full-logits loss, a tiny
Llama, TRL's view of a chat template), kept once here. (Fixtures live in conftest.py; this module
is importable as `helpers` from any test directory: pyproject's pytest `pythonpath` puts tests/ on
sys.path.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List

from trainer.distributed import free_port
from trainer.observability.tracking import read_metrics, series  # noqa: F401  (re-exported: the one metrics reader)

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Small, quick runs: the embedded tiny model on the bundled medical QA pairs. No generations at the
# evals (each costs a collective forward per new token: ~6 s an eval here) and no PNG dashboard at
# the end (~3 s of matplotlib); the tests that check them (distributed/test_wandb.py,
# distributed/test_recipe.py, the dashboard's unit tests) keep them.
QUICK = [
    "+exp=medical_qa",
    "logger=jsonl",
    "trainer.cadence.log_every_steps=1",
    "trainer.schedule.warmup_steps=5",
    "eval.sample_prompts=[]",
    "logger.dashboard=false",
]

# The launcher of runs where it is incidental: torchrun starts one agent process, the deepspeed
# launcher two (its runner, then deepspeed.launcher.launch), each importing torch and deepspeed
# first. The deepspeed launcher keeps the reference run, the kill tests and the launcher tests.
LAUNCHER = "torchrun"

# The reference run of the distributed tiers: 20 steps of 2 ranks x micro 2 x accumulation 2 (8 rows
# a step, 55 packed rows in the set: three epochs), saved every 5 steps.
STRAIGHT = QUICK + [
    "trainer.max_steps=20",
    "trainer.micro_batch_size=2",
    "trainer.grad_accum_steps=2",
    "trainer.cadence.save_every_steps=5",
    "trainer.cadence.eval_every_steps=10",
]

# One rank (plain `python`), micro-batch 8: the same 8 rows per step as STRAIGHT's 2 ranks x 2 x 2.
ONE_RANK = QUICK + ["trainer.max_steps=2", "trainer.micro_batch_size=8", "trainer.export_hf=false"]

# Every rank of every launched run computes with one intra-op thread (trainer/distributed/launcher.py honours
# OMP_NUM_THREADS): runs on 1 rank, 2 ranks or 2 nodes then split their sums alike, whatever the
# machine's core count, so the tests can compare them bit for bit where the rows are the same.
THREADS = {"OMP_NUM_THREADS": "1"}


def launcher_cmd(launcher: str, nproc: int = 2) -> List[str]:
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), "launch/train.py"]
    if launcher == "torchrun":
        return [
            str(BIN / "torchrun"),
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(free_port()),
            "launch/train.py",
        ]
    return [sys.executable, "launch/train.py"]


def run_train(
    launcher: str, overrides: List[str], nproc: int = 2, timeout: int = 600, env: Dict[str, str] = None, **kw
) -> subprocess.CompletedProcess:
    """The entry point under `launcher`; `env`: extra environment variables (e.g. fault injection)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", **THREADS, **(env or {})}
    return subprocess.run(
        launcher_cmd(launcher, nproc) + overrides,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )


def shm_buffers_left(args: List[str]) -> List[str]:
    """DeepSpeed CPU all-reduce buffers still in /dev/shm for the run launched with `args` (its
    --master_port): the trainer unlinks them once every rank has mapped them, killed runs included."""
    port = args[args.index("--master_port") + 1]
    return sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


# ---- reference maths shared by the unit tests ----------------------------------------------------


def close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> bool:
    """Equal up to fp32 summation order: the difference's norm within `rel` of `expected`'s norm."""
    return (actual - expected).norm().item() <= rel * max(expected.norm().item(), 1e-12)


def plain_token_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy through the full [B, T, V] logits: the reference the chunked and Liger
    kernels are checked against (IGNORE targets give 0)."""
    import torch.nn.functional as F

    from data_pipeline.packing import IGNORE

    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none").view(
        targets.shape
    )


def tiny_llama(vocab: int, attn: str = "sdpa", seed: int = 0):
    """A 2-layer random-init Llama (hidden 64, GQA 4/2 heads) in eval mode, its weights drawn from `seed`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            attn_implementation=attn,
        )
    ).eval()


# ---- bench/trl_baseline.py's marked chat template (tests/bench and tests/real_model) ---------------


def trl_baseline():
    """bench/trl_baseline.py as a module (bench/ is scripts, not a package)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import trl_baseline

        return trl_baseline
    finally:
        sys.path.remove(str(ROOT / "bench"))


def assert_same_supervision(tok, record: dict) -> None:
    """Our labels for `record` (every assistant turn: the `instruct` objective) against the assistant
    mask that transformers derives from the template bench/trl_baseline.py marks with `{% generation %}`,
    which is what TRL's assistant_only_loss uses."""
    from data_pipeline.formats import normalise
    from data_pipeline.sources import Record
    from data_pipeline.tokenization import IGNORE, encode

    marked = trl_baseline().marked_chat_template(tok.chat_template)
    assert "{% generation %}" in marked and marked != tok.chat_template
    messages = normalise(Record(record, "test:1"), "auto").messages
    assert tok.apply_chat_template(messages, tokenize=False, chat_template=marked) == tok.apply_chat_template(
        messages, tokenize=False
    )
    ids, labels = encode(tok, normalise(Record(record, "test:1"), "auto"), "instruct")
    theirs = tok.apply_chat_template(
        messages, chat_template=marked, return_dict=True, return_assistant_tokens_mask=True
    )
    assert theirs["input_ids"] == ids
    assert theirs["assistant_masks"] == [int(label != IGNORE) for label in labels]
    assert 0 < sum(theirs["assistant_masks"]) < len(ids)
