"""Observability: the W&B run (read back from its offline file), perf math, spike warnings, samples,
the console, and the PNG dashboard. The 2-rank tests are marked `distributed` (~1 min together)."""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import QUICK, ROOT, check, read_metrics, run_train, series
from wandb_records import offline_runs, payloads, write_log

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
    from trainer.perf import flops_per_token, mfu

    assert flops_per_token(1_000_000, 2, 64, 128) == 6_000_000 + 12 * 2 * 64 * 128 == 6_196_608
    # A 7e9 model (32 layers, 4096 wide) at seq_len 4096: 42e9 + 6.44e9 = 48.44e9 FLOPs per token;
    # 2,000 tokens/s on one H100 is 96.9 TFLOP/s of its 989: 9.8% MFU.
    per_token = flops_per_token(7_000_000_000, 32, 4096, 4096)
    assert per_token == 42e9 + 12 * 32 * 4096 * 4096 == 48_442_450_944
    assert mfu(2_000, per_token, 989e12) == pytest.approx(0.09796, abs=1e-5)


@pytest.mark.parametrize("name,bf16,peak", [
    ("NVIDIA H100 80GB HBM3", True, 989e12), ("NVIDIA H100 PCIe", True, 756e12), ("NVIDIA H100 NVL", True, 835e12),
    ("NVIDIA H200", True, 989e12), ("NVIDIA H200 NVL", True, 835e12), ("NVIDIA A100-SXM4-80GB", True, 312e12),
    ("NVIDIA A100 80GB PCIe", True, 312e12), ("NVIDIA GeForce RTX 4090", True, None), ("NVIDIA H100 80GB HBM3", False, None),
    ("cpu", True, None)])
def test_peak_flops_table(name, bf16, peak):
    from trainer.perf import peak_flops

    assert peak_flops(name, bf16) == peak


@pytest.mark.parametrize("tied", [False, True])
def test_model_flops_count_matmul_parameters(tied):
    """A 2-layer Llama, hidden 64, MLP 128, 4 heads (2 KV heads of 16), vocab 100. Per layer:
    q 64*64 + k 64*32 + v 64*32 + o 64*64 + MLP 3*64*128 + 2 norms of 64 = 36,992; two layers, the
    final norm (64) and the output projection (100*64) give 80,448. Untied, the input embedding
    (a lookup) is left out; tied, it is the output projection and counted once."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.perf import flops_per_token, model_flops_per_token

    cfg = AutoConfig.for_model("llama", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(cfg)
    assert model_flops_per_token(model, 128) == flops_per_token(80_448, 2, 64, 128)


# ---- spikes -------------------------------------------------------------------------------------

def test_spike_rule_on_literals():
    from trainer.perf import is_spike

    flat = [2.0, 2.1, 1.9, 2.0, 2.0]  # median 2.0, MAD 0: threshold max(2.0, 2.0 * 1.1) = 2.2
    assert is_spike(flat, 2.5, z=6, rel=0.1, min_history=5)
    assert not is_spike(flat, 2.15, z=6, rel=0.1, min_history=5)
    assert not is_spike(flat, 9.0, z=6, rel=0.1, min_history=6)  # too little history to judge
    assert is_spike([], float("nan"), z=6, rel=0.1, min_history=5)  # NaN is always worth a line
    noisy = [1.0, 3.0, 1.0, 3.0, 1.0, 3.0]  # median 2, MAD 1: sigma 1.4826, threshold 2 + 8.9
    assert not is_spike(noisy, 10.0, z=6, rel=0.1, min_history=5) and is_spike(noisy, 11.0, z=6, rel=0.1, min_history=5)


def test_spike_warnings_are_rate_limited(caplog):
    from trainer.perf import SpikeWatch

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
    from trainer.tracking import redact_args

    argv = ["+exp=medical", "+model.arch.api_key=abc", "logger.hf_token=xyz", "trainer.lr=1e-4", "--cfg",
            "db_password=p"]
    assert redact_args(argv) == ["+exp=medical", "+model.arch.api_key=<redacted>", "logger.hf_token=<redacted>",
                                 "trainer.lr=1e-4", "--cfg", "db_password=<redacted>"]


@pytest.mark.parametrize("mode,env,expected", [
    (None, {}, "offline"), (None, {"WANDB_API_KEY": "k"}, "online"),
    (None, {"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}, "offline"), (None, {"WANDB_MODE": "disabled"}, "disabled"),
    ("offline", {"WANDB_API_KEY": "k", "WANDB_MODE": "online"}, "offline")])
def test_wandb_mode(mode, env, expected):
    from trainer.config import LoggerConfig
    from trainer.tracking import resolve_mode

    assert resolve_mode(LoggerConfig(mode=mode), env) == expected


def test_resumed_tracker_continues_the_same_run_without_losing_a_row(tmp_path, monkeypatch):
    """In-process, offline: a job logs steps 1-6 and is 'killed' after a checkpoint at 4; the rerun
    resumes at 4 and logs 5-8. W&B's own step keeps rising across both segments, so neither a
    resumed online run nor `wandb sync` can drop the re-logged steps 5 and 6."""
    from trainer.config import LoggerConfig
    from trainer.tracking import Tracker

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
    from trainer.tracking import Progress, _hms

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
            rows.append({"step": step, "train/loss": 3 / (1 + step / 10), "train/lr": 1e-4 * min(1, step / 10),
                         "train/grad_norm": 1 + 0.1 * math.sin(step), "train/tokens_seen": 1000 * step,
                         "perf/tokens_per_s": 5000 + step, "perf/step_time_s": 0.5, "perf/data_wait_s": 0.01,
                         "perf/forward_backward_s": 0.4, "perf/optimizer_s": 0.05, "perf/peak_mem_gb": 1.2,
                         "perf/rank0/peak_mem_gb": 1.2, "perf/rank1/peak_mem_gb": 1.1,
                         "data/packing_efficiency": 0.95, "data/supervised_token_fraction": 0.5})
        if with_eval and step % 10 == 0:
            rows.append({"step": step, "eval/domain/loss": 3 - step / 40, "eval/general/loss": 2 + step / 80,
                         "eval/domain/ppl": 20.0, "eval/forgetting": step / 80})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _colored_fraction_per_panel(png: Path):
    """For each grid cell of the dashboard: the fraction of strongly coloured pixels (plot lines and
    legend swatches; axes, grid and text are grey or black)."""
    import matplotlib.image
    import numpy as np

    from launch.plot import COLUMNS, PANELS

    img = matplotlib.image.imread(str(png))[..., :3]
    colored = (img.max(axis=2) - img.min(axis=2)) > 0.3
    body = colored[int(0.04 * img.shape[0]):]  # below the title
    rows = len(PANELS) // COLUMNS
    h, w = body.shape[0] // rows, body.shape[1] // COLUMNS
    return {name: float(body[i // COLUMNS * h:(i // COLUMNS + 1) * h, i % COLUMNS * w:(i % COLUMNS + 1) * w].mean())
            for i, name in enumerate(PANELS)}


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
    from launch.plot import load, render

    _synthetic_metrics(tmp_path / "metrics.jsonl", with_eval=False)
    fractions = _colored_fraction_per_panel(render(load(tmp_path / "metrics.jsonl"), tmp_path / "d.png"))
    assert fractions["eval loss"] == 0 and fractions["forgetting (Δ eval loss)"] == 0
    assert fractions["loss"] > 0.002


# ---- 2 ranks, real DeepSpeed, logger=wandb offline ----------------------------------------------------

SECRET = "sk-planted-0123456789abcdef"  # a config value under a *_key name
ENV_SECRET = "0123456789abcdef0123456789abcdef01234567"  # WANDB_API_KEY and HF_TOKEN in the environment
WANDB_RUN = QUICK + ["logger=wandb", "trainer.max_steps=6", "trainer.save_every_steps=3", "trainer.eval_every_steps=3",
                     "trainer.export_hf=false", "eval.sample_max_new_tokens=6", "logger.tags=[ci]"]


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    """6 steps on 2 ranks with W&B offline (WANDB_MODE beats the API key in the environment),
    checkpoints at 3 and 6, evals and samples at 0, 3, 6, and a secret planted in the config."""
    out = tmp_path_factory.mktemp("wandb_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_API_KEY", ENV_SECRET)
        mp.setenv("HF_TOKEN", ENV_SECRET)
        proc = run_train("deepspeed", WANDB_RUN + [f"+model.arch.api_key={SECRET}", f"output_dir={out}"])
    check(proc)
    return out, proc


def _history_steps(run, key):
    return sorted(h["trainer/step"] for h in run.history if key in h)


CONTRACT_TRAIN = ("train/loss", "train/lr", "train/grad_norm", "train/tokens_seen", "perf/tokens_per_s",
                  "perf/peak_mem_gb", "data/packing_efficiency")


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_wandb_offline_run_has_config_metrics_and_samples(wandb_run):
    out, proc = wandb_run
    (run,) = offline_runs(out)  # one run per job: rank 1 never starts one
    (record,) = run.runs
    assert run.run_id == json.loads((out / "wandb_run.json").read_text())["run_id"]
    assert (record.project, record.run_group, record.job_type, record.display_name) == \
        ("fullft", "medical_qa", "instruct", out.name)
    assert list(record.tags) == ["ci"]
    # the resolved config, secrets removed
    assert run.config["trainer"]["max_steps"] == 6 and run.config["stage"]["name"] == "instruct"
    assert run.config["model"]["arch"]["api_key"] == "<redacted>"
    # the planted secrets (config and environment) are in no file the run wrote, nor in its output
    written = [p for p in out.rglob("*") if p.is_file()]
    assert len(written) > 20 and any(p.suffix == ".wandb" for p in written)
    for path in written:
        data = path.read_bytes()
        assert SECRET.encode() not in data and ENV_SECRET.encode() not in data, path
    # Our processes print neither; DeepSpeed's launcher (runner.py, launch.py) echoes the command
    # line it starts, overrides included: the README says to pass secrets through the environment.
    ours = [line for line in (proc.stdout + proc.stderr).splitlines()
            if not re.search(r"\[(runner|launch)\.py:\d+:", line)]
    assert not [line for line in ours if SECRET in line or ENV_SECRET in line]
    assert ENV_SECRET not in proc.stdout + proc.stderr
    # contract metrics at the trainer steps they belong to, with the trainer step as x-axis
    for key in CONTRACT_TRAIN:
        assert _history_steps(run, key) == [1, 2, 3, 4, 5, 6], key
    for key in ("eval/domain/loss", "eval/domain/ppl"):
        assert _history_steps(run, key) == [0, 3, 6], key
    assert _history_steps(run, "samples/generations/nrows") == [0, 3, 6]
    assert not any("perf/mfu" in h for h in run.history)  # no peak FLOPs on CPU
    jsonl = read_metrics(out)
    for key in CONTRACT_TRAIN + ("eval/domain/loss",):
        assert {h["trainer/step"]: h[key] for h in run.history if key in h} == series(jsonl, key), key
    from wandb.proto import wandb_internal_pb2 as pb

    metrics = {}
    for blob in payloads(run.raw):
        record = pb.Record()
        record.ParseFromString(blob)
        if record.WhichOneof("record_type") == "metric":
            metrics[record.metric.glob_name or record.metric.name] = record.metric.step_metric
    for ns in ("train", "eval", "perf", "data", "reg", "samples"):
        assert metrics[f"{ns}/*"] == "trainer/step", metrics
    # samples: every rank generated (ZeRO-3), rank 0 wrote them
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 0, 3, 3, 6, 6] and all(isinstance(s["completion"], str) for s in samples)
    # console: one line per log step from rank 0 only
    logs = proc.stdout + proc.stderr
    assert [int(line.split("step ")[1].split("/")[0]) for line in logs.splitlines() if " INFO step " in line] == \
        [1, 2, 3, 4, 5, 6]
    assert "ETA" in logs and "[rank 1] INFO step" not in logs


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_resumed_job_continues_the_same_wandb_run_and_loses_no_metric(wandb_run, tmp_path):
    """The job is rerun as if it had been killed after logging step 6 but before its step-6
    checkpoint completed: latest points at step 3. The rerun (to step 8) resumes at 3, in the same
    W&B run; steps 4-8 are all in its history, above every earlier W&B step."""
    out = tmp_path / "resumed"
    shutil.copytree(wandb_run[0], out)
    (out / "checkpoints/latest").write_text("step_00000003")
    check(run_train("deepspeed", [a for a in WANDB_RUN if not a.startswith("trainer.max_steps")] +
                    ["trainer.max_steps=8", f"+model.arch.api_key={SECRET}", f"output_dir={out}"]))
    first, second = offline_runs(out)
    assert first.run_id == second.run_id
    assert max(h["_step"] for h in first.history) < min(h["_step"] for h in second.history)
    for key in CONTRACT_TRAIN:
        assert _history_steps(second, key) == [4, 5, 6, 7, 8], key
    assert _history_steps(second, "eval/domain/loss") == [6, 8]
    jsonl = read_metrics(out)
    assert [r["step"] for r in jsonl if "train/loss" in r] == list(range(1, 9))  # no gap, no duplicate
    assert {h["trainer/step"]: h["train/loss"] for h in second.history if "train/loss" in h} == \
        {s: v for s, v in series(jsonl, "train/loss").items() if s > 3}
    # the samples table keeps the rows from before the resume point (steps 0 and 3)
    assert [h["samples/generations/nrows"] for h in second.history if "samples/generations/nrows" in h] == [6, 8]


def test_online_start_without_network_falls_back_to_offline(tmp_path, monkeypatch):
    """An API key but no reachable server (a cluster without internet): the job logs offline."""
    from trainer.config import LoggerConfig
    from trainer.tracking import Tracker

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
