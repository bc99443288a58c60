"""Fixtures every tier shares (helpers that are not fixtures: tests/helpers.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from helpers import ONE_RANK, STRAIGHT, check, run_train

# DeepSpeed JIT-builds its CPU ops (the shm all-reduce, cpu_adam) into TORCH_EXTENSIONS_DIR; the
# build files name the venv's include paths, so two checkouts sharing ~/.cache/torch_extensions
# rebuild over each other (and wait on each other's build locks). Each venv keeps its own, as
# `make` does; every run the tests launch inherits it.
# The venv's bin comes first on PATH, as under `make`: the launchers are this venv's, and so is the
# `ninja` that builds those ops (a build by the system's ninja, another version, looks stale to the
# venv's and is redone: ~90 s each time the two alternate).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
# Liger's Triton kernels (trainer.loss_kernel=liger) run on a CPU-only machine through Triton's
# interpreter, which Triton picks when a kernel is defined: at liger-kernel's first import, which
# transformers or TRL may do in any test. So it is set for the whole session here, before anything is
# imported; only trainer.loss_kernel=liger uses it (auto picks Liger on a CUDA GPU alone).
if not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# The training tiers run on 2 pytest-xdist workers, one test file at a time each (make test:
# --dist loadfile): a launched run leaves cores idle while it imports, prepares data on one rank, or
# saves or exports on rank 0, and the other worker's run fills them. A fixture that trains is used
# within one file, or each worker would train it again (the session's reference runs, straight_run
# and one_rank_run: tests/distributed/test_training.py). (xdist's --dist loadgroup would group by
# marker, but with pytest 9 its group suffix never reaches the node id: it silently spreads every
# test.) The longest files are queued first, so that neither worker is left with a long tail; the
# Slurm tier runs in a session of its own, after these (see the Makefile).
FIRST = (
    "test_training.py",
    "test_real_training.py",
    "test_bench_perf.py",
    "test_faults.py",
    "test_recipe.py",
    "test_elastic_resume.py",
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)) if item.get_closest_marker("distributed") else -1)


def pytest_sessionstart(session):
    """DeepSpeed's CPU ops are built by `make setup`; when they are not (pytest run by hand in another
    venv), build them here, once, before any test starts a run that needs them. Built inside a test,
    a run would take ~90 s longer, and a test's timeout killing it mid-build leaves a lock file every
    later run waits on forever. Under pytest-xdist only the controller builds."""
    if hasattr(session.config, "workerinput"):
        return
    from trainer.distributed.ops import build_cpu_ops

    build_cpu_ops()


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory):
    """STRAIGHT under `deepspeed`, W&B offline: the reference run of the distributed and fault tiers."""
    out = tmp_path_factory.mktemp("straight")
    proc = run_train("deepspeed", STRAIGHT + ["logger=wandb", f"output_dir={out}"])
    check(proc)
    return out, proc


@pytest.fixture(scope="session")
def one_rank_run(tmp_path_factory):
    """ONE_RANK under plain `python` (world size 1): 2 steps, its checkpoint at step 2."""
    out = tmp_path_factory.mktemp("one_rank")
    proc = run_train("python", ONE_RANK + [f"output_dir={out}"])
    check(proc)
    return out, proc


@pytest.fixture(scope="session", autouse=True)
def no_shared_memory_left_behind():
    """The whole suite must not leave DeepSpeed shared-memory buffers behind (64 MiB of RAM each,
    until reboot): before the trainer unlinked them, one test session left ~9 GiB in /dev/shm and
    the machine slowed to a crawl."""
    before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    yield
    # A buffer that a live process maps belongs to a run still going (another pytest-xdist worker's,
    # between DeepSpeed's init and the trainer's unlink): not left behind.
    left = sorted(p.name for p in set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) - before - _mapped_shm())
    assert not left, f"{len(left)} DeepSpeed shm buffer(s) left in /dev/shm by this test session: {left[:10]}"


def _mapped_shm() -> set:
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped |= {
                Path(line.split()[-1])
                for line in maps.read_text().splitlines()
                if "/dev/shm/deepspeed_allreduce_buffer_" in line
            }
        except OSError:  # the process ended meanwhile
            continue
    return mapped


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tiny model's sentencepiece tokenizer, trained (or loaded from cache) as a run would."""
    from trainer.cli import load_config
    from trainer.engine.tokenizer import load_tokenizer

    return load_tokenizer(load_config(["+exp=medical"]).model)
