"""Fixtures every tier shares (helpers that are not fixtures: tests/helpers.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from helpers import STRAIGHT, check, run_train

# DeepSpeed JIT-builds its CPU ops (the shm all-reduce, cpu_adam) into TORCH_EXTENSIONS_DIR; the
# build files name the venv's include paths, so two checkouts sharing ~/.cache/torch_extensions
# rebuild over each other (and wait on each other's build locks). Each venv keeps its own, as
# `make` does; every run the tests launch inherits it.
# The venv's bin comes first on PATH, as under `make`: the launchers are this venv's, and so is the
# `ninja` that builds those ops (a build by the system's ninja, another version, looks stale to the
# venv's and is redone: ~90 s each time the two alternate).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def pytest_sessionstart(session):
    """Build DeepSpeed's CPU communication op once, here, before any test starts a run that needs it
    (every run on CPU does, at init). Built inside a test, the first run would take ~90 s longer,
    and a test's timeout killing it mid-build leaves a lock file every later run waits on forever.
    Under pytest-xdist only the controller builds; the workers find it built."""
    if hasattr(session.config, "workerinput"):
        return
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")  # None on a GPU accelerator
    if builder is not None:
        builder.load(verbose=False)


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory):
    """STRAIGHT under `deepspeed`, W&B offline: the reference run of the distributed and fault tiers."""
    out = tmp_path_factory.mktemp("straight")
    proc = run_train("deepspeed", STRAIGHT + ["logger=wandb", f"output_dir={out}"])
    check(proc)
    return out, proc


@pytest.fixture(scope="session", autouse=True)
def no_shared_memory_left_behind():
    """The whole suite must not leave DeepSpeed shared-memory buffers behind (64 MiB of RAM each,
    until reboot): before the trainer unlinked them, one test session left ~9 GiB in /dev/shm and
    the machine slowed to a crawl."""
    before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    yield
    left = sorted(p.name for p in set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) - before)
    assert not left, f"{len(left)} DeepSpeed shm buffer(s) left in /dev/shm by this test session: {left[:10]}"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tiny model's sentencepiece tokenizer, trained (or loaded from cache) as a run would."""
    from trainer.cli import load_config
    from trainer.tokenizer import load_tokenizer

    return load_tokenizer(load_config(["+exp=medical"]).model)
