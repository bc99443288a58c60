"""Observability without a training run: the W&B offline-file reader, perf math, spike warnings, W&B
modes and resume, the console, and the PNG dashboard (tests/distributed/test_wandb.py has the 2-rank runs)."""

from __future__ import annotations

import json
import logging
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, read_metrics, series
from wandb_records import offline_runs, payloads, write_log

ENV_SECRET = "0123456789abcdef0123456789abcdef01234567"  # WANDB_API_KEY in the environment

# ---- the offline-run reader ---------------------------------------------------------------------


def test_record_reader_reassembles_records_across_blocks():
    rng = random.Random(0)
    # 32,761 fills the first block exactly (7 file header + 7 record header); 70,000 spans three.
    blobs = [bytes(rng.getrandbits(8) for _ in range(n)) for n in (10, 32_761 - 7, 40_000, 0, 70_000, 5)]
    assert list(payloads(write_log(blobs))) == blobs


def test_record_reader_parses_wandb_records():
    from wandb.proto import wandb_internal_pb2 as pb

    record = pb.Record()
    item = record.history.item.add()
    item.key, item.value_json = "train/loss", "1.5"
    (blob,) = payloads(write_log([record.SerializeToString()]))
    again = pb.Record()
    again.ParseFromString(blob)
    assert again.history.item[0].key == "train/loss" and json.loads(again.history.item[0].value_json) == 1.5


# ---- perf math ----------------------------------------------------------------------------------


def test_flops_per_token_and_mfu_hand_computed():
    from trainer.observability.perf import flops_per_token, mfu

    assert flops_per_token(1_000_000, 2, 64, 128) == 6_000_000 + 12 * 2 * 64 * 128 == 6_196_608
    # A 7e9 model (32 layers, 4096 wide) at seq_len 4096: 42e9 + 6.44e9 = 48.44e9 FLOPs per token;
    # 2,000 tokens/s on one H100 is 96.9 TFLOP/s of its 989: 9.8% MFU.
    per_token = flops_per_token(7_000_000_000, 32, 4096, 4096)
    assert per_token == 42e9 + 12 * 32 * 4096 * 4096 == 48_442_450_944
    assert mfu(2_000, per_token, 989e12) == pytest.approx(0.09796, abs=1e-5)


@pytest.mark.parametrize(
    "name,bf16,peak",
    [
        ("NVIDIA H100 80GB HBM3", True, 989e12),
        ("NVIDIA H100 PCIe", True, 756e12),
        ("NVIDIA H100 NVL", True, 835e12),
        ("NVIDIA H200", True, 989e12),
        ("NVIDIA H200 NVL", True, 835e12),
        ("NVIDIA A100-SXM4-80GB", True, 312e12),
        ("NVIDIA A100 80GB PCIe", True, 312e12),
        ("NVIDIA GeForce RTX 4090", True, None),
        ("NVIDIA H100 80GB HBM3", False, None),
        ("cpu", True, None),
    ],
)
def test_peak_flops_table(name, bf16, peak):
    from trainer.observability.perf import peak_flops

    assert peak_flops(name, bf16) == peak


@pytest.mark.parametrize("tied", [False, True])
def test_model_flops_count_matmul_parameters(tied):
    """A 2-layer Llama, hidden 64, MLP 128, 4 heads (2 KV heads of 16), vocab 100. Per layer:
    q 64*64 + k 64*32 + v 64*32 + o 64*64 + MLP 3*64*128 + 2 norms of 64 = 36,992; two layers, the
    final norm (64) and the output projection (100*64) give 80,448. Untied, the input embedding
    (a lookup) is left out; tied, it is the output projection and counted once."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.observability.perf import flops_per_token, model_flops_per_token

    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    assert model_flops_per_token(model, 128) == flops_per_token(80_448, 2, 64, 128)


# ---- spikes -------------------------------------------------------------------------------------


def test_spike_rule_on_literals():
    from trainer.observability.perf import is_spike

    flat = [2.0, 2.1, 1.9, 2.0, 2.0]  # median 2.0, MAD 0: threshold max(2.0, 2.0 * 1.1) = 2.2
    assert is_spike(flat, 2.5, z=6, rel=0.1, min_history=5)
    assert not is_spike(flat, 2.15, z=6, rel=0.1, min_history=5)
    assert not is_spike(flat, 9.0, z=6, rel=0.1, min_history=6)  # too little history to judge
    assert is_spike([], float("nan"), z=6, rel=0.1, min_history=5)  # NaN is always worth a line
    noisy = [1.0, 3.0, 1.0, 3.0, 1.0, 3.0]  # median 2, MAD 1: sigma 1.4826, threshold 2 + 8.9
    assert not is_spike(noisy, 10.0, z=6, rel=0.1, min_history=5) and is_spike(noisy, 11.0, z=6, rel=0.1, min_history=5)


def test_spike_warnings_are_rate_limited(caplog):
    from trainer.observability.perf import SpikeWatch

    watch = SpikeWatch(enabled=True, window=20, min_history=10, cooldown=50)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        for step in range(1, 21):
            assert watch.update(step, {"train/loss": 2.0, "train/grad_norm": 1.0}) == []
        first = watch.update(21, {"train/loss": 5.0, "train/grad_norm": 1.0})
        assert watch.update(22, {"train/loss": 6.0, "train/grad_norm": 1.0}) == []  # held back
        for step in range(23, 80):
            watch.update(step, {"train/loss": 2.0, "train/grad_norm": 1.0})
        later = watch.update(80, {"train/loss": 9.0, "train/grad_norm": 50.0})
    assert first == ["train/loss spike at step 21: 5 vs recent median 2"]
    assert later[0] == "train/loss spike at step 80: 9 vs recent median 2 (1 more since step 21)"
    assert later[1].startswith("train/grad_norm spike at step 80")
    assert [r.getMessage() for r in caplog.records] == first + later
    assert SpikeWatch(enabled=False).update(1, {"train/loss": float("nan")}) == []  # ranks > 0 stay quiet


# ---- W&B run management ---------------------------------------------------------------------------


def test_secret_overrides_are_redacted_from_the_arguments_wandb_records():
    from trainer.observability.tracking import redact_args

    argv = [
        "+exp=medical",
        "+model.arch.api_key=abc",
        "logger.hf_token=xyz",
        "trainer.optim.lr=1e-4",
        "--cfg",
        "db_password=p",
    ]
    assert redact_args(argv) == [
        "+exp=medical",
        "+model.arch.api_key=<redacted>",
        "logger.hf_token=<redacted>",
        "trainer.optim.lr=1e-4",
        "--cfg",
        "db_password=<redacted>",
    ]


@pytest.mark.parametrize(
    "mode,env,expected",
    [
        (None, {}, "offline"),
        (None, {"WANDB_API_KEY": "k"}, "online"),
        (None, {"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}, "offline"),
        (None, {"WANDB_MODE": "disabled"}, "disabled"),
        ("offline", {"WANDB_API_KEY": "k", "WANDB_MODE": "online"}, "offline"),
    ],
)
def test_wandb_mode(mode, env, expected):
    from trainer.config import LoggerConfig
    from trainer.observability.tracking import resolve_mode

    assert resolve_mode(LoggerConfig(mode=mode), env) == expected


def test_resumed_tracker_continues_the_same_run_without_losing_a_row(tmp_path, monkeypatch):
    """In-process, offline: a job logs steps 1-6 and is 'killed' after a checkpoint at 4; the rerun
    resumes at 4 and logs 5-8. W&B's own step keeps rising across both segments, so neither a
    resumed online run nor `wandb sync` can drop the re-logged steps 5 and 6."""
    from trainer.config import LoggerConfig
    from trainer.observability.tracking import Tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = LoggerConfig(backend="wandb", project="test")
    for start, stop in ((1, 6), (5, 8)):
        tracker = Tracker(cfg, str(tmp_path), "exp", {"a": 1}, resume_step=start - 1, enabled=True, job_type="sft")
        for step in range(start, stop + 1):
            tracker.log(step, {"train/loss": 10.0 / step + (0.5 if start > 1 else 0.0)})
            if step % 2 == 0:
                tracker.log_samples(step, [{"prompt": "p", "completion": f"c{step}"}])
        tracker.close()
    first, second = offline_runs(tmp_path)
    assert first.run_id == second.run_id == json.loads((tmp_path / "wandb_run.json").read_text())["run_id"]
    assert max(h["_step"] for h in first.history) < min(h["_step"] for h in second.history)
    loss = {h["trainer/step"]: h["train/loss"] for h in second.history if "train/loss" in h}
    assert loss == {s: 10.0 / s + 0.5 for s in range(5, 9)}  # the rerun's values, every one of them
    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps == list(range(1, 9)) and series(read_metrics(tmp_path), "train/loss")[5] == 2.5
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2, 4, 6, 8]
    tables = [h for h in second.history if "samples/generations/nrows" in h]
    assert [t["samples/generations/nrows"] for t in tables] == [3, 4]  # kept rows of steps 2, 4 + new ones
    assert second.runs[0].job_type == "sft" and second.runs[0].run_group == "exp"


# ---- console ------------------------------------------------------------------------------------


def test_progress_logs_one_line_per_log_step_with_eta(caplog):
    from trainer.observability.tracking import Progress, _hms

    assert _hms(3725.4) == "1:02:05" and _hms(None) == "?"
    progress = Progress(start_step=10, max_steps=110, enabled=True)  # stderr is not a terminal here
    assert progress.bar is None
    progress.started -= 20.0  # 10 steps in 20 s: 90 left, 180 s
    with caplog.at_level(logging.INFO, logger="trainer"):
        progress.update(20)
        progress.log(20, {"train/loss": 1.5, "train/lr": 1e-4, "train/grad_norm": 0.5, "perf/tokens_per_s": 1e4})
    progress.close()
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("step 20/110  loss 1.5000") and line.endswith("10000 tok/s  ETA 0:03:00")


# ---- the PNG dashboard ----------------------------------------------------------------------------


def _synthetic_metrics(path: Path, with_eval: bool = True) -> None:
    rows = []
    for step in range(0, 41):
        if step and step % 2 == 0:
            rows.append(
                {
                    "step": step,
                    "train/loss": 3 / (1 + step / 10),
                    "train/lr": 1e-4 * min(1, step / 10),
                    "train/grad_norm": 1 + 0.1 * math.sin(step),
                    "train/tokens_seen": 1000 * step,
                    "perf/tokens_per_s": 5000 + step,
                    "perf/step_time_s": 0.5,
                    "perf/data_wait_s": 0.01,
                    "perf/forward_backward_s": 0.4,
                    "perf/optimizer_s": 0.05,
                    "perf/peak_mem_gb": 1.2,
                    "perf/rank0/peak_mem_gb": 1.2,
                    "perf/rank1/peak_mem_gb": 1.1,
                    "data/packing_efficiency": 0.95,
                    "data/supervised_token_fraction": 0.5,
                }
            )
        if with_eval and step % 10 == 0:
            rows.append(
                {
                    "step": step,
                    "eval/domain/loss": 3 - step / 40,
                    "eval/general/loss": 2 + step / 80,
                    "eval/domain/ppl": 20.0,
                    "eval/forgetting": step / 80,
                }
            )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _colored_fraction_per_panel(png: Path):
    """For each grid cell of the dashboard: the fraction of strongly coloured pixels (plot lines and
    legend swatches; axes, grid and text are grey or black)."""
    import matplotlib.image

    from trainer.observability.dashboard import COLUMNS, PANELS

    img = matplotlib.image.imread(str(png))[..., :3]
    colored = (img.max(axis=2) - img.min(axis=2)) > 0.3
    body = colored[int(0.04 * img.shape[0]) :]  # below the title
    rows = len(PANELS) // COLUMNS
    h, w = body.shape[0] // rows, body.shape[1] // COLUMNS
    return {
        name: float(body[i // COLUMNS * h : (i // COLUMNS + 1) * h, i % COLUMNS * w : (i % COLUMNS + 1) * w].mean())
        for i, name in enumerate(PANELS)
    }


def test_plot_writes_a_png_with_every_panel_drawn(tmp_path):
    _synthetic_metrics(tmp_path / "metrics.jsonl")
    proc = subprocess.run([sys.executable, "launch/plot.py", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    png = tmp_path / "dashboard.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    fractions = _colored_fraction_per_panel(png)
    assert all(f > 0.002 for f in fractions.values()), fractions


def test_plot_check_sees_an_empty_panel(tmp_path):
    """The pixel check is not vacuous: without eval rows, the eval and forgetting panels say
    "no data" (grey text) and have no coloured pixels."""
    from trainer.observability.dashboard import render
    from trainer.observability.tracking import read_metrics as load

    _synthetic_metrics(tmp_path / "metrics.jsonl", with_eval=False)
    fractions = _colored_fraction_per_panel(render(load(tmp_path / "metrics.jsonl"), tmp_path / "d.png"))
    assert fractions["eval loss"] == 0 and fractions["Δ eval loss"] == 0
    assert fractions["loss"] > 0.002


def _delta_panel_texts(rows):
    """The Δ eval loss panel's title and legend entries, read off the drawn figure."""
    import matplotlib.pyplot as plt

    from trainer.observability.dashboard import figure

    fig = figure(rows)
    try:
        (ax,) = [ax for ax in fig.axes if ax.get_title().startswith("Δ eval loss")]
        return ax.get_title(), [t.get_text() for t in ax.get_legend().get_texts()]
    finally:
        plt.close(fig)


def test_the_delta_panel_calls_a_general_rise_forgetting_and_a_domain_fall_gain(tmp_path):
    from trainer.observability.tracking import read_metrics as load

    _synthetic_metrics(tmp_path / "metrics.jsonl")
    title, legend = _delta_panel_texts(load(tmp_path / "metrics.jsonl"))
    assert title == "Δ eval loss since the first eval\nforgetting (general) and gain (domain)"
    assert legend == [
        "domain: gain (Δ loss < 0 = learned)",
        "general: forgetting (Δ loss > 0 = forgot)",
        "eval/forgetting (general, vs the base model)",
    ]


def test_the_delta_panel_of_a_stage_without_a_general_set_does_not_say_forgetting(tmp_path):
    """medical_qa's eval sets: a domain set alone. Its fall is the stage's gain, nothing is forgotten."""
    from trainer.observability.tracking import read_metrics as load

    _synthetic_metrics(tmp_path / "metrics.jsonl")
    rows = [
        {k: v for k, v in r.items() if not k.startswith(("eval/general/", "eval/forgetting"))}
        for r in load(tmp_path / "metrics.jsonl")
    ]
    title, legend = _delta_panel_texts(rows)
    assert title == "Δ eval loss since the first eval\ngain (domain)"
    assert legend == ["domain: gain (Δ loss < 0 = learned)"]
    assert "forgetting" not in title + "".join(legend)


# ---- W&B without a network ---------------------------------------------------------------------


def test_online_start_without_network_falls_back_to_offline(tmp_path, monkeypatch):
    """An API key but no reachable server (a cluster without internet): the job logs offline."""
    from trainer.config import LoggerConfig
    from trainer.observability.tracking import Tracker

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", ENV_SECRET)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "2")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = Tracker(LoggerConfig(backend="wandb"), str(tmp_path), "exp", {}, 0, enabled=True)
    tracker.log(1, {"train/loss": 1.0})
    tracker.close()
    (run,) = offline_runs(tmp_path)
    assert [h["train/loss"] for h in run.history] == [1.0]
