"""Unit: the DeepSpeed config builder."""

from __future__ import annotations

import json

import pytest

from trainer.config import DeepSpeedConfig, TrainerConfig
from trainer.engine.deepspeed_config import build_deepspeed_config


def test_batch_sizes_are_consistent_by_construction():
    cfg = build_deepspeed_config(
        DeepSpeedConfig(), TrainerConfig(micro_batch_size=3, grad_accum_steps=5), 4, on_gpu=False
    )
    assert cfg["train_micro_batch_size_per_gpu"] == 3
    assert cfg["gradient_accumulation_steps"] == 5
    assert cfg["train_batch_size"] == 3 * 5 * 4
    assert cfg["zero_optimization"]["stage"] == 3


def test_precision_bf16_on_gpu_fp32_on_cpu():
    assert build_deepspeed_config(DeepSpeedConfig(), TrainerConfig(), 1, on_gpu=True)["bf16"]["enabled"] is True
    assert build_deepspeed_config(DeepSpeedConfig(), TrainerConfig(), 1, on_gpu=False)["bf16"]["enabled"] is False
    assert (
        build_deepspeed_config(DeepSpeedConfig(), TrainerConfig(precision="fp32"), 1, on_gpu=True)["bf16"]["enabled"]
        is False
    )


def test_offload_sections_only_when_asked():
    plain = build_deepspeed_config(DeepSpeedConfig(), TrainerConfig(), 2, on_gpu=True)["zero_optimization"]
    assert "offload_optimizer" not in plain and "offload_param" not in plain
    off = build_deepspeed_config(
        DeepSpeedConfig(offload_optimizer="cpu", offload_param="cpu"), TrainerConfig(), 2, on_gpu=True
    )["zero_optimization"]
    assert off["offload_optimizer"]["device"] == "cpu" and off["offload_param"]["device"] == "cpu"


def test_user_json_adds_keys_and_auto_defers(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(
        json.dumps(
            {
                "comms_logger": {"enabled": True},
                "train_batch_size": "auto",
                "zero_optimization": {"stage": 3, "sub_group_size": 1000},
            }
        )
    )
    cfg = build_deepspeed_config(
        DeepSpeedConfig(config_file=str(user)), TrainerConfig(micro_batch_size=2), 2, on_gpu=False
    )
    assert cfg["comms_logger"] == {"enabled": True}
    assert cfg["zero_optimization"]["sub_group_size"] == 1000
    assert cfg["train_batch_size"] == 4


def test_user_json_contradiction_is_an_error_naming_both_values_and_the_fix(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ValueError) as err:
        build_deepspeed_config(
            DeepSpeedConfig(config_file=str(user)), TrainerConfig(micro_batch_size=4), 2, on_gpu=False
        )
    msg = str(err.value)
    assert str(user) in msg
    assert "train_micro_batch_size_per_gpu: trainer has 4" in msg and "16" in msg and "trainer.micro_batch_size" in msg
    assert "zero_optimization.stage" in msg


def test_user_json_that_is_not_json_names_file_and_line(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text('{\n  "a": 1,\n  oops\n}')
    with pytest.raises(ValueError, match=r"ds.json:3"):
        build_deepspeed_config(DeepSpeedConfig(config_file=str(user)), TrainerConfig(), 1, on_gpu=False)
