"""Config tier: every file under conf/ composes into the typed schema; mistakes fail at compose time
with a message that names the valid keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from helpers import ROOT
from trainer.cli import register, to_config
from trainer.config import GROUP_SCHEMAS, Config

CONF = ROOT / "conf"
GROUPS = tuple(GROUP_SCHEMAS)  # one conf/ folder per group the library registers a schema for


def all_conf_files():
    files = sorted(p.relative_to(CONF) for p in CONF.rglob("*.yaml"))
    assert files, "no config files found"
    return files


def overrides_for(rel: Path):
    if rel.parts[0] == "exp":
        return [f"+exp={rel.with_suffix('').relative_to('exp').as_posix()}"]
    if rel.parts[0] in GROUPS:
        return [f"{rel.parts[0]}={rel.with_suffix('').relative_to(rel.parts[0]).as_posix()}"]
    if rel.parts[0] == "hydra":  # hydra/<group>/<name>.yaml: one of Hydra's own groups (the Slurm launcher)
        return [f"{rel.parent.as_posix()}={rel.stem}"]
    assert rel == Path("config.yaml"), f"{rel}: a conf file outside the known groups {GROUPS} + exp/ + hydra/"
    return []


@pytest.mark.parametrize("rel", all_conf_files(), ids=str)
def test_every_conf_file_composes_into_the_schema(rel):
    if rel.parts[:2] == ("hydra", "launcher"):
        pytest.importorskip(
            "hydra_plugins.hydra_submitit_launcher", reason="needs the slurm extra: pip install -e '.[slurm]'"
        )
    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides_for(rel), return_hydra_config=rel.parts[0] == "hydra")
    if rel.parts[0] == "hydra":  # selected, with its values in; then the rest as usual
        assert OmegaConf.select(cfg, ".".join(rel.parent.parts)), rel
        with open_dict(cfg):
            del cfg["hydra"]
    config = to_config(cfg)
    assert isinstance(config, Config)
    if rel.parts[0] in GROUPS:  # the file was really selected, not silently ignored
        group = getattr(config, rel.parts[0])
        assert type(group) is GROUP_SCHEMAS[rel.parts[0]], (rel, type(group))
        wrong = _differences(_yaml_values(rel), _as_plain(group))
        assert not wrong, f"{rel}: the composed {rel.parts[0]} does not hold the file's values: {wrong}"


def _yaml_values(rel: Path) -> dict:
    """What a group file sets itself (its defaults list left out), interpolations resolved."""
    values = OmegaConf.to_container(OmegaConf.load(CONF / rel), resolve=True)
    values.pop("defaults", None)
    return values


def _as_plain(schema_object) -> dict:
    """A composed group's dataclass as YAML would spell it (enums as their names)."""
    return OmegaConf.to_container(OmegaConf.structured(schema_object), enum_to_str=True)


def _differences(expected, actual, path: str = "") -> list:
    """`path: expected != actual` for every value the YAML sets that the composed group does not hold."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        return [
            d
            for k, v in expected.items()
            for d in (
                _differences(v, actual[k], f"{path}.{k}".lstrip("."))
                if k in actual
                else [f"{path}.{k}".lstrip(".") + ": missing"]
            )
        ]
    return [] if expected == actual else [f"{path}: {expected!r} != {actual!r}"]


def test_the_group_check_sees_a_file_that_was_not_selected():
    """The check above is not vacuous: the default model's values are not model/tiny_qwen2.yaml's."""
    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        default = to_config(compose(config_name="config"))
    assert "model_type: 'qwen2' != 'llama'" in _differences(
        _yaml_values(Path("model/tiny_qwen2.yaml")), _as_plain(default.model)
    )


def test_every_group_has_a_yaml_for_its_default_and_exp_medical_exists():
    for group in GROUPS:
        assert list((CONF / group).glob("*.yaml")), group
    assert (CONF / "exp" / "medical.yaml").read_text().startswith("# @package _global_")


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "launch/train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_typo_fails_before_any_model_is_built_and_names_the_valid_keys():
    proc = run_cli("+exp=medical", "trainer.max_stpes=3")
    assert proc.returncode != 0
    err = proc.stderr
    assert "trainer.max_stpes" in err and "max_steps" in err and "micro_batch_size" in err, err
    assert "Did you mean 'trainer.max_steps'" in err
    assert "parameters" not in proc.stdout + err  # nothing was built


def test_wrong_type_fails_naming_the_key():
    proc = run_cli("trainer.optim.lr=fast")
    assert proc.returncode != 0
    assert "trainer.optim.lr" in proc.stderr and "fast" in proc.stderr


def test_cross_field_check_says_what_to_change():
    proc = run_cli("trainer.activation_checkpointing=sometimes")
    assert proc.returncode != 0
    assert "trainer.activation_checkpointing='sometimes'" in proc.stderr and "every_n" in proc.stderr


def test_cfg_job_prints_the_composed_config_without_training():
    proc = run_cli("+exp=medical_qa", "trainer.max_steps=7", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "max_steps: 7" in proc.stdout and "exp_name: medical" in proc.stdout and "objective: instruct" in proc.stdout


def test_output_dir_is_one_fixed_path_not_a_timestamp():
    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = to_config(compose(config_name="config", overrides=["+exp=medical"]))
    assert cfg.output_dir == "outputs/medical"


def _bad_configs(tmp: Path):
    contradicting = tmp / "ds.json"
    contradicting.write_text('{"train_micro_batch_size_per_gpu": 3, "wall_clock_breakdown": true}')
    (tmp / "a_file").write_text("")
    return [
        (["regularizer=replay", "regularizer.replay.ratio=1.0"], "regularizer.replay.ratio=1.0: must be in [0, 1)"),
        (
            ["regularizer=ewc", "regularizer.ewc.fisher_data=null"],
            "regularizer=ewc needs reference data for the Fisher",
        ),
        ([f"deepspeed.config_file={contradicting}"], "contradicts the trainer config"),
        ([f"output_dir={tmp / 'a_file' / 'out'}"], f"output_dir='{tmp / 'a_file' / 'out'}' is not writable"),
        ([f"model.name_or_path={tmp / 'no_such_model'}"], f"'{tmp / 'no_such_model'}' does not exist"),
        (["data.seq_len=4096"], "data.seq_len=4096 exceeds the model's max_position_embeddings=2048"),
        # OPT masks by row, not by document: packing would leak attention between samples.
        (["model.model_type=opt"], "model_type='opt' with attn_implementation='sdpa' lets packed documents attend"),
    ]


@pytest.mark.parametrize("case", range(7))
def test_bad_configuration_fails_before_data_or_model_naming_the_fix(case, tmp_path):
    overrides, message = _bad_configs(tmp_path)[case]
    proc = run_cli("+exp=medical_qa", f"output_dir={tmp_path / 'run'}", *overrides)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and message in text, text[-3000:]
    assert "parameters |" not in text and "prepar" not in text.lower(), "it got as far as the data or the model"


@pytest.mark.skipif(Path("/dev/nvidia0").exists(), reason="on a GPU machine Liger's kernel can run")
def test_the_liger_kernel_asked_for_where_it_cannot_run_stops_before_anything_starts(monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # tests/conftest.py sets it for the tests that run Liger
    proc = run_cli("+exp=medical_qa", f"output_dir={tmp_path / 'run'}", "trainer.loss_kernel=liger")
    text = proc.stdout + proc.stderr
    assert (
        proc.returncode != 0
        and "Config error: trainer.loss_kernel=liger: Liger's Triton kernels need a CUDA GPU" in text
    )
    assert "set trainer.loss_kernel=torch (or auto)" in text and "Traceback" not in text, text[-3000:]
    assert "prepar" not in text.lower()


def test_pad_to_multiple_of_below_one_is_refused_naming_the_key():
    from trainer.config import DataConfig

    with pytest.raises(ValueError, match=r"data.pad_to_multiple_of=0: must be at least 1"):
        DataConfig(pad_to_multiple_of=0)


def test_replay_objective_and_fisher_labels_are_checked_where_they_are_set():
    from trainer.cli import load_config, preflight

    register()
    cfg = load_config(
        [
            "stage=pretrain",
            "regularizer=ewc_replay",
            "regularizer.replay.objective=instruct",
            "regularizer.ewc.fisher_labels=sampled",
        ]
    )
    assert cfg.regularizer.replay.objective == "instruct" and cfg.regularizer.ewc.fisher_labels == "sampled"
    # auto resolves per source: the stage's text is split at row ends, the replayed chats are kept whole
    assert cfg.overlong == "split" and cfg.overlong_for(cfg.regularizer.replay.objective) == "truncate"
    with pytest.raises(SystemExit, match=r"regularizer.ewc.fisher_labels='model': use one of data, sampled"):
        preflight(["regularizer=ewc", "regularizer.ewc.fisher_labels=model"])
    with pytest.raises(
        SystemExit,
        match=r"data.overlong=split is for continued pretraining; "
        r"regularizer.replay.objective=instruct needs whole samples",
    ):
        load_config(
            ["stage=pretrain", "data.overlong=split", "regularizer=replay", "regularizer.replay.objective=instruct"]
        )


def test_a_dpo_stage_composes_and_refuses_what_it_cannot_do():
    from trainer.cli import load_config

    register()
    cfg = load_config(["stage=dpo", "data=medical_prefs", "stage.loss=simpo", "stage.beta=2.0"])
    assert (cfg.stage.objective, cfg.stage.loss, cfg.stage.beta, cfg.stage.simpo_gamma) == ("dpo", "simpo", 2.0, 0.5)
    assert cfg.stage.token_objective == "instruct" and cfg.overlong == "truncate"
    with pytest.raises(SystemExit, match=r"regularizer=replay with stage=dpo: replay is refused in a preference stage"):
        load_config(["stage=dpo", "data=medical_prefs", "regularizer=replay"])
    with pytest.raises(SystemExit, match=r"stage.label_smoothing is not defined for stage.loss=ipo"):
        load_config(["stage=dpo", "stage.loss=ipo", "stage.label_smoothing=0.1"])
    with pytest.raises(SystemExit, match=r"stage.beta=0.0: must be > 0"):
        load_config(["stage=dpo", "stage.beta=0"])
    with pytest.raises(SystemExit, match=r"data.overlong=split is for continued pretraining; stage=dpo"):
        load_config(["stage=dpo", "data.overlong=split"])
    with pytest.raises(SystemExit, match=r"stage.loss='kto': use one of dpo, ipo, simpo"):
        from trainer.cli import preflight

        preflight(["stage=dpo", "stage.loss=kto"])


# ---- moved keys: the flat trainer names of before the grouping keep working ----------------------


def test_every_moved_trainer_key_names_a_field_of_its_group_with_the_same_type():
    import dataclasses
    import typing

    from trainer.config import TRAINER_MOVED, TrainerConfig

    hints = typing.get_type_hints(TrainerConfig)
    for old, new in TRAINER_MOVED.items():
        group, key = new.split(".")
        target = typing.get_type_hints(hints[group])[key]
        assert hints[old] == typing.Optional[target], (old, hints[old], target)  # the alias: the same type, or null
        assert (
            dataclasses.fields(TrainerConfig)[[f.name for f in dataclasses.fields(TrainerConfig)].index(old)].default
            is None
        )


def test_an_old_override_on_the_command_line_still_sets_the_new_key_and_says_so(caplog):
    from trainer.cli import load_config

    with caplog.at_level("WARNING", logger="trainer"):
        config = load_config(
            [
                "trainer.lr=1e-5",
                "trainer.warmup_steps=3",
                "trainer.lr_schedule=constant",
                "trainer.resume_fallback=true",
            ]
        )
    t = config.trainer
    assert (t.optim.lr, t.schedule.warmup_steps, t.schedule.decay, t.resume.fallback) == (1e-5, 3, "constant", True)
    assert t.lr is None and t.warmup_steps is None  # moved, never read twice
    text = caplog.text
    assert "trainer.lr= is deprecated; use trainer.optim.lr=1e-5" in text
    assert "trainer.lr_schedule= is deprecated; use trainer.schedule.decay=constant" in text
    assert "trainer.resume_fallback= is deprecated; use trainer.resume.fallback=true" in text


def test_an_old_key_in_a_users_yaml_file_still_sets_the_new_key_and_says_so(tmp_path):
    """A user's experiment file written before the grouping (flat trainer keys) composes, its values
    land in the groups, and each moved key is named with its new place."""
    import shutil

    from trainer.cli import load_config

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "exp" / "old_style.yaml").write_text(
        "# @package _global_\n"
        "trainer:\n  max_steps: 7\n  lr: 2.0e-4\n  save_every_steps: 0\n  on_nonfinite: skip\n  elastic_resume: false\n"
    )
    with pytest.warns(FutureWarning) as warned:
        t = load_config(["+exp=old_style"], config_dir=str(conf)).trainer
    said = " ".join(str(w.message) for w in warned)
    assert (t.max_steps, t.optim.lr, t.cadence.save_every_steps) == (7, 2e-4, 0)
    assert (t.failure.on_nonfinite, t.resume.elastic) == ("skip", False)
    for old, new in [
        ("lr", "optim.lr"),
        ("save_every_steps", "cadence.save_every_steps"),
        ("elastic_resume", "resume.elastic"),
    ]:
        assert f"trainer.{old} is deprecated: use trainer.{new}" in said, old
    # a moved value is checked where it lands: the group's own rule names the new key
    (conf / "exp" / "old_bad.yaml").write_text("# @package _global_\ntrainer:\n  min_lr_ratio: 2.0\n")
    with (
        pytest.raises(SystemExit, match=r"trainer\.schedule\.min_lr_ratio=2\.0: must be in \[0, 1\]"),
        pytest.warns(FutureWarning),
    ):
        load_config(["+exp=old_bad"], config_dir=str(conf))


def test_a_misspelt_key_suggests_the_new_names_not_the_deprecated_ones():
    from trainer.cli import explain_key_error

    assert "Did you mean 'trainer.optim.lr'" in explain_key_error("trainer.optim.lrr")
    hint = explain_key_error("trainer.warmup_step")
    assert "warmup_steps" not in hint.split("Did you mean")[0] and "schedule" in hint, hint


def test_config_yaml_and_wandb_see_the_grouped_keys_only():
    from trainer.cli import load_config
    from trainer.config import TRAINER_MOVED, config_tree

    tree = config_tree(load_config(["trainer.lr=1e-5"]))
    assert tree["trainer"]["optim"]["lr"] == 1e-5
    assert not set(TRAINER_MOVED) & set(tree["trainer"]), sorted(tree["trainer"])


def test_the_old_stage_name_override_still_selects_the_objective(caplog):
    from trainer.cli import load_config

    with caplog.at_level("WARNING", logger="trainer"):
        assert load_config(["stage=sft", "stage.name=instruct"]).stage.objective == "instruct"
    assert "stage.name= is deprecated; use stage.objective=instruct" in caplog.text
