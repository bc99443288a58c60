"""Chained recipes: how stages are composed and chained (config tier), and the medical recipe run end
to end on 2 CPU ranks (base -> cpt -> instruct, EWC Fisher carried, forgetting measured)."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from conftest import ROOT, check, read_metrics, run_train, series
from trainer.config import register_configs, to_config
from trainer.recipe import stage_overrides


def plan_for(overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        c = lambda o: to_config(compose(config_name="config", overrides=o))  # noqa: E731
        return {name: cfg for name, cfg in stage_overrides(c(overrides), c, overrides)}


def test_stages_chain_model_fisher_and_forgetting_reference():
    plan = plan_for(["+exp=medical", "output_dir=/runs/m", "trainer.max_steps=7"])
    assert list(plan) == ["base", "cpt", "instruct"]
    base, cpt, instruct = plan.values()
    assert [c.output_dir for c in plan.values()] == ["/runs/m/base", "/runs/m/cpt", "/runs/m/instruct"]
    assert all(c.trainer.max_steps == 7 for c in plan.values())  # the command line wins over a stage's own
    assert (base.stage.name, cpt.stage.name, instruct.stage.name) == ("pretrain", "pretrain", "instruct")
    assert base.model.name_or_path is None and cpt.model.name_or_path == "/runs/m/base/hf"
    assert instruct.model.name_or_path == "/runs/m/cpt/hf"
    assert cpt.regularizer.ewc.previous is None  # base ran without EWC
    assert instruct.regularizer.ewc.previous == "/runs/m/cpt"  # online EWC: cpt's Fisher carried
    # forgetting is measured against the model cpt started from, not the random init
    assert cpt.eval.baseline_from is None and instruct.eval.baseline_from == "/runs/m/cpt"
    assert all(not c.recipe for c in plan.values())


def test_a_pretrained_model_skips_the_random_init_stage():
    plan = plan_for(["+exp=medical", "model=llama3_8b"])
    assert list(plan) == ["cpt", "instruct"]
    assert plan["cpt"].model.name_or_path.endswith("Meta-Llama-3-8B")


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_medical_recipe_runs_every_stage_and_a_rerun_skips_finished_ones(tmp_path):
    overrides = ["+exp=medical", "logger=jsonl", "trainer.max_steps=4", "trainer.save_every_steps=4",
                 "trainer.eval_every_steps=2", "trainer.log_every_steps=1", "regularizer.ewc.fisher_batches=2",
                 "eval.sample_prompts=[]", f"output_dir={tmp_path}"]
    proc = run_train("deepspeed", overrides)
    check(proc)
    log = proc.stdout + proc.stderr
    assert "merged with the previous stage's" in log  # instruct's Fisher = gamma * cpt's + its own
    for stage in ("base", "cpt", "instruct"):
        assert (tmp_path / stage / "hf" / "model.safetensors").is_file(), stage
    # the final stage's outputs also sit where a single run's would
    assert (tmp_path / "hf").resolve() == (tmp_path / "instruct" / "hf").resolve()
    assert (tmp_path / "metrics.jsonl").is_file() and (tmp_path / "config.yaml").is_file()
    assert (tmp_path / "instruct" / "dashboard.png").stat().st_size > 10_000  # drawn without W&B
    assert "summary eval/forgetting" in log
    instruct = read_metrics(tmp_path / "instruct")
    assert set(series(instruct, "eval/forgetting")) == {2, 4}
    assert "reg/ewc_penalty" in instruct[-3] or any("reg/ewc_penalty" in r for r in instruct)
    assert any("data/replay_token_fraction" in r for r in instruct)
    cpt_start = json.loads((tmp_path / "cpt/checkpoints/step_00000004/trainer_state.json").read_text())["baseline"]
    last = series(instruct, "eval/general/loss")[4]
    assert series(instruct, "eval/forgetting")[4] == pytest.approx(last - cpt_start["eval/general/loss"])
    again = run_train("deepspeed", overrides)  # the same command: every stage is already complete
    check(again)
    assert (again.stdout + again.stderr).count("already complete at step 4") == 3
