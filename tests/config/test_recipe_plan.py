"""Chained recipes (config tier): how stages are composed and chained (model, Fisher, forgetting
reference), and a pretrained model skipping the random-init stage."""

from __future__ import annotations

from hydra import compose, initialize_config_dir

from helpers import ROOT
from trainer.cli import register, to_config
from trainer.recipe import stage_overrides


def plan_for(overrides):
    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        c = lambda o: to_config(compose(config_name="config", overrides=o))  # noqa: E731
        return {name: cfg for name, cfg in stage_overrides(c(overrides), c, overrides)}


def test_stages_chain_model_fisher_and_forgetting_reference():
    plan = plan_for(["+exp=medical", "output_dir=/runs/m", "trainer.max_steps=7"])
    assert list(plan) == ["base", "cpt", "instruct", "align"]
    base, cpt, instruct, align = plan.values()
    assert [c.output_dir for c in plan.values()] == ["/runs/m/base", "/runs/m/cpt", "/runs/m/instruct", "/runs/m/align"]
    assert all(c.trainer.max_steps == 7 for c in plan.values())  # the command line wins over a stage's own
    assert (base.stage.objective, cpt.stage.objective, instruct.stage.objective) == ("pretrain", "pretrain", "instruct")
    assert base.model.name_or_path is None and cpt.model.name_or_path == "/runs/m/base/hf"
    assert instruct.model.name_or_path == "/runs/m/cpt/hf"
    assert cpt.regularizer.ewc.previous is None  # base ran without EWC
    assert instruct.regularizer.ewc.previous == "/runs/m/cpt"  # online EWC: cpt's Fisher carried
    # forgetting is measured against the model cpt started from, not the random init
    assert cpt.eval.baseline_from is None and instruct.eval.baseline_from == "/runs/m/cpt"
    assert all(not c.recipe for c in plan.values())
    # align: DPO from instruct's export, instruct's Fisher carried, pairs held out beside the forgetting sets
    assert (
        align.stage.objective == "dpo"
        and align.stage.loss == "dpo"
        and align.model.name_or_path == "/runs/m/instruct/hf"
    )
    assert align.regularizer.name == "ewc" and align.regularizer.ewc.previous == "/runs/m/instruct"
    assert set(align.eval.sets) == {"general", "domain", "prefs"} and align.eval.baseline_from == "/runs/m/cpt"


def test_a_pretrained_model_skips_the_random_init_stage():
    plan = plan_for(["+exp=medical", "model=llama3_8b"])
    assert list(plan) == ["cpt", "instruct", "align"]
    assert plan["cpt"].model.name_or_path.endswith("Meta-Llama-3-8B")


def test_a_model_brings_its_own_numbers_for_each_stage_and_the_command_line_still_wins():
    """model.stage_overrides (conf/model/smollm2_135m.yaml): `+exp=medical model=smollm2_135m` trains
    cpt and instruct with the real model's learning rates and sizes, not the tiny model's."""
    plan = plan_for(
        [
            "+exp=medical",
            "model=smollm2_135m",
            "model.name_or_path=/models/smollm2",
            "output_dir=/runs/s",
            "trainer.optim.lr=1e-5",
        ]
    )
    assert list(plan) == ["cpt", "instruct", "align"]  # pretrained: no random-init base stage
    cpt, instruct = plan["cpt"], plan["instruct"]
    assert (cpt.trainer.max_steps, instruct.trainer.max_steps) == (20, 20)
    assert cpt.data.seq_len == instruct.data.seq_len == 512 and cpt.trainer.micro_batch_size == 1
    assert cpt.trainer.optim.lr == instruct.trainer.optim.lr == 1e-5  # the command line's
    assert cpt.model.name_or_path == "/models/smollm2" and instruct.model.name_or_path == "/runs/s/cpt/hf"
    # cpt: distillation on the start's own answers to the bundled prompts (the best measured setting on
    # this model), no replay or EWC; instruct: replay + EWC, its Fisher its own (cpt has none to carry)
    d = cpt.regularizer.distill
    assert cpt.regularizer.name == "none" and d.weight == 1 and d.prompts.endswith("bundled/general_prompts.txt")
    assert instruct.regularizer.name == "ewc_replay" and not instruct.regularizer.distill.enabled
    assert instruct.regularizer.ewc.previous is None and instruct.eval.baseline_from == "/runs/s/cpt"
    lrs = {
        n: c.trainer.optim.lr
        for n, c in plan_for(["+exp=medical", "model=smollm2_135m", "model.name_or_path=/m", "output_dir=/r"]).items()
    }
    assert lrs == {"cpt": 5e-5, "instruct": 3e-5, "align": 5e-6}
