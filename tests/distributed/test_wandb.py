"""Observability on 2 real ranks: the W&B offline run (read back from its file) has the config without
secrets, every contract metric at its steps equal to metrics.jsonl, the samples table; a resumed job
continues the same run and loses no row."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from helpers import LAUNCHER, QUICK, check, read_metrics, run_train, series
from wandb_records import offline_runs, payloads

# ---- 2 ranks, real DeepSpeed, logger=wandb offline ----------------------------------------------------

SECRET = "sk-planted-0123456789abcdef"  # a config value under a *_key name
ENV_SECRET = "0123456789abcdef0123456789abcdef01234567"  # WANDB_API_KEY and HF_TOKEN in the environment
# The generations are the point here: QUICK turns them off, this run puts the prompts of +exp=medical_qa back.
WANDB_RUN = [a for a in QUICK if not a.startswith("eval.sample_prompts")] + [
    "logger=wandb",
    "trainer.max_steps=6",
    "trainer.cadence.save_every_steps=3",
    "trainer.cadence.eval_every_steps=3",
    "trainer.export_hf=false",
    "eval.sample_max_new_tokens=6",
    "logger.tags=[ci]",
]


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    """6 steps on 2 ranks with W&B offline (WANDB_MODE beats the API key in the environment),
    checkpoints at 3 and 6, evals and samples at 0, 3, 6, and a secret planted in the config."""
    out = tmp_path_factory.mktemp("wandb_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_API_KEY", ENV_SECRET)
        mp.setenv("HF_TOKEN", ENV_SECRET)
        proc = run_train(LAUNCHER, WANDB_RUN + [f"+model.arch.api_key={SECRET}", f"output_dir={out}"])
    check(proc)
    return out, proc


def _history_steps(run, key):
    return sorted(h["trainer/step"] for h in run.history if key in h)


CONTRACT_TRAIN = (
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "train/tokens_seen",
    "perf/tokens_per_s",
    "perf/peak_mem_gb",
    "data/packing_efficiency",
)


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_wandb_offline_run_has_config_metrics_and_samples(wandb_run):
    out, proc = wandb_run
    (run,) = offline_runs(out)  # one run per job: rank 1 never starts one
    (record,) = run.runs
    assert run.run_id == json.loads((out / "wandb_run.json").read_text())["run_id"]
    assert (record.project, record.run_group, record.job_type, record.display_name) == (
        "fullft",
        "medical_qa",
        "instruct",
        out.name,
    )
    assert list(record.tags) == ["ci"]
    # the resolved config, secrets removed
    assert run.config["trainer"]["max_steps"] == 6 and run.config["stage"]["objective"] == "instruct"
    assert run.config["model"]["arch"]["api_key"] == "<redacted>"
    # the planted secrets (config and environment) are in no file the run wrote, nor in its output
    written = [p for p in out.rglob("*") if p.is_file()]
    assert len(written) > 20 and any(p.suffix == ".wandb" for p in written)
    for path in written:
        data = path.read_bytes()
        assert SECRET.encode() not in data and ENV_SECRET.encode() not in data, path
    # Our processes print neither; DeepSpeed's launcher (runner.py, launch.py) echoes the command
    # line it starts, overrides included: the README says to pass secrets through the environment.
    ours = [
        line for line in (proc.stdout + proc.stderr).splitlines() if not re.search(r"\[(runner|launch)\.py:\d+:", line)
    ]
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
    assert [int(line.split("step ")[1].split("/")[0]) for line in logs.splitlines() if " INFO step " in line] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]
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
    check(
        run_train(
            LAUNCHER,
            [a for a in WANDB_RUN if not a.startswith("trainer.max_steps")]
            + ["trainer.max_steps=8", f"+model.arch.api_key={SECRET}", f"output_dir={out}"],
        )
    )
    first, second = offline_runs(out)
    assert first.run_id == second.run_id
    assert max(h["_step"] for h in first.history) < min(h["_step"] for h in second.history)
    for key in CONTRACT_TRAIN:
        assert _history_steps(second, key) == [4, 5, 6, 7, 8], key
    assert _history_steps(second, "eval/domain/loss") == [6, 8]
    jsonl = read_metrics(out)
    assert [r["step"] for r in jsonl if "train/loss" in r] == list(range(1, 9))  # no gap, no duplicate
    assert {h["trainer/step"]: h["train/loss"] for h in second.history if "train/loss" in h} == {
        s: v for s, v in series(jsonl, "train/loss").items() if s > 3
    }
    # the samples table keeps the rows from before the resume point (steps 0 and 3)
    assert [h["samples/generations/nrows"] for h in second.history if "samples/generations/nrows" in h] == [6, 8]
