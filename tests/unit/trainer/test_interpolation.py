"""Weight interpolation with the stage's start (trainer/forgetting/interpolation.py): α specs, depth groups and LiNeS,
the interpolation itself, the offline command, the choice of α, and the config's checks. The
in-run sweep under ZeRO-3 is tested in tests/distributed/test_training.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import ROOT
from trainer.cli import load_config
from trainer.forgetting.interpolation import (
    GROUPS,
    Lines,
    alpha_label,
    alpha_of,
    check,
    choose,
    group_of,
    interpolate,
    parse_alpha,
    swept,
    write_interpolated,
)


def test_alpha_specs_parse_and_print_back():
    assert parse_alpha("0.25") == 0.25 and parse_alpha(1) == 1.0
    spec = parse_alpha("bottom=0.25, top=0.5")
    assert spec == {"bottom": 0.25, "middle": 1.0, "top": 0.5}
    assert parse_alpha(alpha_label(spec)) == spec and alpha_label(0.5) == "0.5"
    with pytest.raises(ValueError, match="unknown group.*'lower'"):
        parse_alpha("lower=0.5")
    with pytest.raises(ValueError, match="'top=x' is not group=number"):
        parse_alpha("bottom=0.5,top=x")
    with pytest.raises(ValueError, match="expected a number"):
        parse_alpha("half")


@pytest.mark.parametrize(
    "name,group",
    [
        ("model.embed_tokens.weight", "bottom"),
        ("model.layers.0.self_attn.q_proj.weight", "bottom"),
        ("model.layers.9.mlp.up_proj.weight", "bottom"),
        ("model.layers.10.mlp.up_proj.weight", "middle"),
        ("model.layers.19.input_layernorm.weight", "middle"),
        ("model.layers.20.mlp.down_proj.weight", "top"),
        ("model.layers.29.post_attention_layernorm.weight", "top"),
        ("model.norm.weight", "top"),
        ("lm_head.weight", "top"),
    ],
)
def test_depth_groups_of_a_30_layer_model(name, group):
    assert group_of(name, 30) == group


def test_interpolation_is_exact_per_group_and_checks_shapes():
    torch.manual_seed(0)
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.w",
        "model.layers.1.w",
        "model.layers.2.w",
        "model.norm.weight",
    ]
    start = {n: torch.randn(4, 3) for n in names}
    end = {n: torch.randn(4, 3) for n in names}
    mixed = interpolate(start, end, {"bottom": 0.0, "middle": 0.5, "top": 1.0}, num_layers=3)
    assert torch.equal(mixed["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    assert torch.equal(mixed["model.layers.0.w"], start["model.layers.0.w"])
    assert torch.allclose(mixed["model.layers.1.w"], (start["model.layers.1.w"] + end["model.layers.1.w"]) / 2)
    assert torch.equal(mixed["model.layers.2.w"], end["model.layers.2.w"])
    assert torch.equal(mixed["model.norm.weight"], end["model.norm.weight"])
    uniform = interpolate(start, end, 0.25, num_layers=3)
    assert all(torch.allclose(uniform[n], start[n] + 0.25 * (end[n] - start[n])) for n in names)
    with pytest.raises(ValueError, match=r"model.norm.weight is \(4, 3\) at the start and \(5, 3\)"):
        interpolate(start, {**end, "model.norm.weight": torch.zeros(5, 3)}, 0.5, 3)
    with pytest.raises(KeyError, match="the start has no"):
        interpolate({}, end, 0.5, 3)


def _hf_dir(path, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_the_offline_command_writes_the_interpolated_model(tmp_path):
    from safetensors.torch import load_file

    a, b = _hf_dir(tmp_path / "start", 0), _hf_dir(tmp_path / "end", 1)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.forgetting.interpolation",
            str(a),
            str(b),
            str(tmp_path / "out"),
            "--alpha",
            "bottom=0.5,middle=0,top=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    w0, w1 = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.allclose(
        out["model.embed_tokens.weight"], (w0["model.embed_tokens.weight"] + w1["model.embed_tokens.weight"]) / 2
    )
    assert torch.equal(out["model.layers.1.mlp.up_proj.weight"], w0["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(out["model.layers.2.mlp.up_proj.weight"], w1["model.layers.2.mlp.up_proj.weight"])
    info = json.loads((tmp_path / "out" / "interpolation.json").read_text())
    assert info["alpha"] == "bottom=0.5,middle=0,top=1" and list(info["groups"]) == list(GROUPS)
    with pytest.raises(FileExistsError, match="nothing is overwritten"):
        write_interpolated(str(a), str(b), 0.5, str(tmp_path / "out"))
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.forgetting.interpolation",
            str(a),
            str(b),
            str(tmp_path / "x"),
            "--alpha",
            "mid=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "unknown group(s) ['mid']" in bad.stderr


def _row(alpha, gain):
    return {"alpha": alpha, "eval/domain_gain": gain}


def test_choose_takes_the_smallest_alpha_that_keeps_the_gain():
    rows = [_row(0.0, 0.0), _row(0.25, 0.5), _row(0.5, 0.9), _row(0.75, 0.97), _row(1.0, 1.0)]
    assert choose(rows, 0.95)["alpha"] == 0.75
    assert choose(rows, 0.9)["alpha"] == 0.5
    assert choose(rows, 1.0)["alpha"] == 1.0
    # a fine-tune that gained nothing on the domain exports itself (nothing to trade)
    assert choose([_row(0.5, 0.1), _row(1.0, -0.2)], 0.95)["alpha"] == 1.0


def test_config_checks_name_key_and_value():
    base = ["+exp=medical_qa", "output_dir=/tmp/x"]
    with pytest.raises(SystemExit, match=r"regularizer.interpolation.alphas=\[0.5, 1.5\]: \[1.5\] outside \[0, 1\]"):
        load_config(base + ["regularizer.interpolation.alphas=[0.5,1.5]"])
    with pytest.raises(SystemExit, match=r"keep_gain=0.0: must be in \(0, 1\]"):
        load_config(base + ["regularizer.interpolation.keep_gain=0"])
    bad = load_config(base + ["regularizer.interpolation.alpha={low:0.5}", "model.name_or_path=/m"])
    with pytest.raises(ValueError, match="regularizer.interpolation.alpha: .*unknown group"):
        check(bad, baseline_expected=True)
    cfg = load_config(base + ["regularizer.interpolation.alphas=[0.5]"])
    with pytest.raises(ValueError, match="needs the stage's start on disk: set model.name_or_path"):
        check(cfg, baseline_expected=True)
    cfg = load_config(base + ["regularizer.interpolation.alphas=[0.5]", "model.name_or_path=/m", "~eval.sets.domain"])
    with pytest.raises(ValueError, match=r"\+eval.sets.domain=PATH"):
        check(cfg, baseline_expected=True)
    cfg = load_config(base + ["regularizer.interpolation.alphas=[0.5]", "model.name_or_path=/m"])
    with pytest.raises(ValueError, match="keep eval.at_start=true"):
        check(cfg, baseline_expected=False)
    check(cfg, baseline_expected=True)
    cfg = load_config(
        base + ["regularizer.interpolation.alpha=0.5", "model.name_or_path=/m", "trainer.export_hf=false"]
    )
    with pytest.raises(ValueError, match="trainer.export_hf=true"):
        check(cfg, baseline_expected=True)
    assert not load_config(base).regularizer.interpolation.enabled
    grouped = load_config(base + ["regularizer.interpolation.alpha={bottom:0.5,top:0.75}"]).regularizer.interpolation
    assert parse_alpha(grouped.alpha) == {"bottom": 0.5, "middle": 1.0, "top": 0.75}


# ---- LiNeS: λ(ℓ) = α + β·ℓ/(L−1) ------------------------------------------------------------------


def test_lines_specs_parse_print_back_and_refuse_a_lambda_outside_0_1():
    spec = parse_alpha("alpha=0.25,beta=0.5")
    assert spec == Lines(0.25, 0.5) and parse_alpha(alpha_label(spec)) == spec
    assert parse_alpha({"alpha": 0.2}) == Lines(0.2, 0.8)  # β left out: the top keeps the whole update
    with pytest.raises(ValueError, match=r"alpha=0.5, beta=0.75 gives λ from 0.5 \(first block\) to 1.25"):
        parse_alpha("alpha=0.5,beta=0.75")
    with pytest.raises(ValueError, match="unknown group"):
        parse_alpha("beta=0.5")  # β alone is no spec


def test_lines_scales_each_block_by_its_depth():
    """A 5-block model under (α, β) = (0.2, 0.8): block ℓ moves 0.2 + 0.2ℓ of its update; the embeddings
    take α, the final norm α + β. A tied head is the embedding's tensor and follows it."""
    torch.manual_seed(0)
    names = ["model.embed_tokens.weight", *[f"model.layers.{i}.mlp.w" for i in range(5)], "model.norm.weight"]
    start = {n: torch.randn(3, 2) for n in names}
    end = {n: torch.randn(3, 2) for n in names}
    mixed = interpolate(start, end, Lines(0.2, 0.8), num_layers=5)
    expected = {"model.embed_tokens.weight": 0.2, "model.norm.weight": 1.0}
    expected.update({f"model.layers.{i}.mlp.w": 0.2 + 0.2 * i for i in range(5)})
    for name, lam in expected.items():
        assert torch.allclose(mixed[name], start[name] + lam * (end[name] - start[name]), atol=1e-6), name
    assert alpha_of(Lines(0.2, 0.8), "lm_head.weight", 5) == 1.0  # an untied head is the top
    assert alpha_of(Lines(0.3, 0.0), "model.layers.4.w", 5) == 0.3  # β = 0: a uniform α


def test_a_lines_sweep_applies_beta_to_each_alpha_below_one():
    assert swept(0.25, 0.5) == Lines(0.25, 0.5) and swept(1.0, 0.5) == 1.0 and swept(0.25, None) == 0.25
    base = ["+exp=medical_qa", "output_dir=/tmp/x"]
    cfg = load_config(base + ["regularizer.interpolation.alphas=[0,0.25]", "regularizer.interpolation.beta=0.75"])
    assert cfg.regularizer.interpolation.beta == 0.75
    with pytest.raises(SystemExit, match=r"beta=0.75: with alphas \[0.5\] the top block's λ = α \+ β leaves"):
        load_config(base + ["regularizer.interpolation.alphas=[0.25,0.5]", "regularizer.interpolation.beta=0.75"])
    with pytest.raises(SystemExit, match=r"beta=0.5 shapes the swept alphas, and none are set"):
        load_config(base + ["regularizer.interpolation.beta=0.5"])
    fixed = load_config(base + ["regularizer.interpolation.alpha={alpha:0.25,beta:0.5}", "model.name_or_path=/m"])
    check(fixed, baseline_expected=True)
    assert parse_alpha(fixed.regularizer.interpolation.alpha) == Lines(0.25, 0.5)


def test_the_offline_command_writes_a_lines_interpolation(tmp_path):
    from safetensors.torch import load_file

    a, b = _hf_dir(tmp_path / "start", 0), _hf_dir(tmp_path / "end", 1)
    out = write_interpolated(str(a), str(b), parse_alpha("alpha=0,beta=1"), str(tmp_path / "out"))
    w0, w1, mixed = (load_file(str(d / "model.safetensors")) for d in (a, b, out))
    name = "model.layers.{}.mlp.up_proj.weight"
    assert torch.equal(mixed[name.format(0)], w0[name.format(0)])  # λ(0) = 0
    assert torch.allclose(mixed[name.format(1)], (w0[name.format(1)] + w1[name.format(1)]) / 2, atol=1e-6)
    assert torch.allclose(mixed[name.format(2)], w1[name.format(2)], atol=1e-6)  # λ(L-1) = 1
    assert torch.equal(mixed["model.embed_tokens.weight"], w0["model.embed_tokens.weight"])  # tied: α = 0
    info = json.loads((out / "interpolation.json").read_text())
    assert info["alpha"] == "alpha=0,beta=1" and "lambda(l) = alpha + beta * l / (L - 1)" in info["rule"]
