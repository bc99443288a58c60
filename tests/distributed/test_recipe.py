"""The medical recipe end to end on 2 CPU ranks (base -> cpt -> instruct -> align, EWC Fisher carried,
forgetting measured, DPO on preference pairs last); a rerun skips finished stages."""

from __future__ import annotations

import json

import pytest

from helpers import LAUNCHER, check, read_metrics, run_train, series


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_medical_recipe_runs_every_stage_and_a_rerun_skips_finished_ones(tmp_path):
    overrides = [
        "+exp=medical",
        "logger=jsonl",
        "trainer.max_steps=4",
        "trainer.cadence.save_every_steps=4",
        "trainer.cadence.eval_every_steps=2",
        "trainer.cadence.log_every_steps=2",
        "regularizer.ewc.fisher_batches=2",
        "eval.sample_prompts=[]",
        f"output_dir={tmp_path}",
    ]
    proc = run_train(LAUNCHER, overrides)
    check(proc)
    log = proc.stdout + proc.stderr
    assert "merged with the previous stage's" in log  # instruct's Fisher = gamma * cpt's + its own
    for stage in ("base", "cpt", "instruct", "align"):
        assert (tmp_path / stage / "hf" / "model.safetensors").is_file(), stage
    # the final stage's outputs also sit where a single run's would
    assert (tmp_path / "hf").resolve() == (tmp_path / "align" / "hf").resolve()
    assert (tmp_path / "metrics.jsonl").is_file() and (tmp_path / "config.yaml").is_file()
    assert (tmp_path / "instruct" / "dashboard.png").stat().st_size > 10_000  # drawn without W&B
    assert "summary eval/forgetting" in log
    instruct = read_metrics(tmp_path / "instruct")
    assert set(series(instruct, "eval/forgetting")) == {2, 4}
    assert "reg/ewc_penalty" in instruct[-3] or any("reg/ewc_penalty" in r for r in instruct)
    # Logged every 2 steps, each line describes both steps (trainer/observability/metrics.py): replay is a tenth of
    # the tokens, so no line may say 0 the way a line that only showed its own step could.
    for stage in ("cpt", "instruct"):
        replay = series(read_metrics(tmp_path / stage), "data/replay_token_fraction")
        assert sorted(replay) == [2, 4] and all(0.02 < f < 0.3 for f in replay.values()), (stage, replay)
    cpt_start = json.loads((tmp_path / "cpt/checkpoints/step_00000004/trainer_state.json").read_text())["baseline"]
    last = series(instruct, "eval/general/loss")[4]
    assert series(instruct, "eval/forgetting")[4] == pytest.approx(last - cpt_start["eval/general/loss"])
    # align: DPO from instruct's export, its reference scored once, EWC with instruct's Fisher merged in,
    # held-out pairs scored beside the forgetting sets
    assert log.count("merged with the previous stage's") == 2 and "reference log-probs of main" in log
    align = read_metrics(tmp_path / "align")
    assert set(series(align, "eval/prefs/rewards/accuracies")) == {0, 2, 4}
    assert set(series(align, "eval/forgetting")) == {2, 4} and series(align, "rewards/margins")
    assert (tmp_path / "align" / "dashboard.png").stat().st_size > 10_000
    again = run_train(LAUNCHER, overrides)  # the same command: every stage is already complete
    check(again)
    assert (again.stdout + again.stderr).count("already complete at step 4") == 4
