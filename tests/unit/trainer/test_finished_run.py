"""A rerun of a finished run is skipped before anything is built (trainer/loop.py:fit), but only
when output_dir's run is of the model asked for."""

from __future__ import annotations

import dataclasses

from omegaconf import OmegaConf

from trainer.build import same_model as _same_model
from trainer.cli import load_config


def test_only_the_same_model_counts_as_this_run(tmp_path):
    cfg = load_config(["+exp=medical_qa", f"output_dir={tmp_path}"])
    assert not _same_model(cfg)  # no config.yaml: nothing to compare with
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(cfg))))
    assert _same_model(cfg)
    assert _same_model(load_config(["+exp=medical_qa", f"output_dir={tmp_path}", "trainer.optim.lr=1e-5"]))
    assert not _same_model(load_config(["+exp=medical_qa", f"output_dir={tmp_path}", "model.arch.hidden_size=128"]))
    assert not _same_model(load_config(["+exp=medical_qa", f"output_dir={tmp_path}", "model=tiny_qwen2"]))
