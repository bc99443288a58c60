"""trainer.distributed.strip_launcher_args: the launcher's --local_rank / --local-rank flag is taken out
of argv before Hydra parses the overrides, and its value becomes LOCAL_RANK unless the launcher
already set that variable (the environment wins)."""

from __future__ import annotations

import os

import pytest

from trainer.distributed import strip_launcher_args

OVERRIDES = ["+exp=medical_qa", "trainer.optim.lr=1e-4", "output_dir=/tmp/run"]


@pytest.fixture
def no_local_rank(monkeypatch):
    """LOCAL_RANK unset for the test and restored after it, even though the code under test sets it
    in os.environ itself (a setenv first makes monkeypatch remember the original state)."""
    monkeypatch.setenv("LOCAL_RANK", "unset-by-the-test")
    monkeypatch.delenv("LOCAL_RANK")


@pytest.mark.parametrize("flag", ["--local_rank=3", "--local-rank=3"])
def test_flag_with_value_is_removed_and_sets_local_rank(no_local_rank, flag):
    assert strip_launcher_args([flag] + OVERRIDES) == OVERRIDES
    assert os.environ["LOCAL_RANK"] == "3"


@pytest.mark.parametrize("flag", ["--local_rank", "--local-rank"])
def test_flag_with_a_separate_value_removes_both(no_local_rank, flag):
    assert strip_launcher_args([OVERRIDES[0], flag, "5"] + OVERRIDES[1:]) == OVERRIDES
    assert os.environ["LOCAL_RANK"] == "5"


def test_a_bare_flag_at_the_end_means_rank_zero(no_local_rank):
    assert strip_launcher_args(OVERRIDES + ["--local_rank"]) == OVERRIDES
    assert os.environ["LOCAL_RANK"] == "0"


def test_no_flag_leaves_argv_and_the_environment_alone(no_local_rank):
    argv = list(OVERRIDES)
    assert strip_launcher_args(argv) == OVERRIDES
    assert argv == OVERRIDES  # a new list; the input is not changed
    assert "LOCAL_RANK" not in os.environ
    assert strip_launcher_args([]) == []


def test_the_launchers_environment_wins_over_the_flag(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert strip_launcher_args(["--local_rank=3"] + OVERRIDES) == OVERRIDES
    assert os.environ["LOCAL_RANK"] == "1"


def test_lookalikes_are_overrides_not_the_flag(no_local_rank):
    """Only the exact flag (and a numeric =value) is the launcher's: anything else goes on to Hydra,
    which names it if it is not a valid override."""
    argv = ["--local_rank=x", "--local_ranks=1", "local_rank=1", "+trainer.local_rank=2"]
    assert strip_launcher_args(argv) == argv
    assert "LOCAL_RANK" not in os.environ
