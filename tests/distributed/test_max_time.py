"""trainer.max_time on a real run: it saves, stops cleanly (exit 0) and the rerun resumes."""

from __future__ import annotations

import os

import pytest

from helpers import QUICK, check, read_metrics, run_train


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_max_time_saves_stops_cleanly_and_the_rerun_resumes(tmp_path, monkeypatch):
    """A 1 s budget is spent before the first step ends: the run saves at step 1 and exits 0
    without the export; the same command without the budget resumes at step 1."""
    args = QUICK + ["trainer.max_steps=3", f"output_dir={tmp_path}"]
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)  # tests run inside a Slurm job must not requeue it
    stopped = run_train("python", args + ["trainer.max_time=1s"])
    check(stopped)
    assert "STOPPED EARLY at step 1: trainer.max_time reached" in stopped.stderr
    assert (tmp_path / "checkpoints/latest").read_text() == "step_00000001"
    assert not (tmp_path / "hf").exists()
    resumed = run_train("python", args)
    check(resumed)
    assert "at step 1" in resumed.stderr and "resumed from" in resumed.stderr
    assert [r["step"] for r in read_metrics(tmp_path) if "train/loss" in r] == [1, 2, 3]
    assert (tmp_path / "hf/config.json").exists()
