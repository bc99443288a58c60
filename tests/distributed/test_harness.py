"""Distributed tier: lm-eval-harness tasks (eval.harness) on the live ZeRO-3 engine of 2 CPU ranks, at
the stage's start and end, logged as eval/harness/<task>/<metric>; the loglikelihood tasks' numbers
equal `lm_eval --model hf` (lm-eval's own CLI and Hugging Face model class) on the stage's export, and
so do the instruction-following task's greedy answers."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from helpers import BIN, ROOT, THREADS, check, read_metrics, run_train, series

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

TASKS = ["fullft_general", "fullft_medical"]
LIMIT = 12
HARNESS = [
    "stage=sft",
    "data=medical_qa",
    "logger=wandb",
    "eval.sample_prompts=[]",
    "trainer.max_steps=3",
    "trainer.micro_batch_size=2",
    "trainer.optim.lr=5e-4",
    "trainer.schedule.warmup_steps=1",
    f"eval.harness.tasks=[{','.join(TASKS)}]",
    "eval.harness.chat_tasks=[fullft_ifeval]",
    f"eval.harness.limit={LIMIT}",
    "eval.harness.max_length=256",
    "eval.harness.gen_kwargs='max_gen_toks=16'",
]


@pytest.fixture(scope="module")
def harness_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("harness")
    proc = run_train("torchrun", HARNESS + [f"output_dir={out}"])
    check(proc)
    return out, proc


def test_tasks_run_at_start_and_end_on_every_rank_and_are_logged(harness_run):
    out, proc = harness_run
    rows = read_metrics(out)
    for task, metric in [(t, m) for t in TASKS for m in ("acc", "acc_norm")] + [
        ("fullft_ifeval", "prompt_level_acc"),
        ("fullft_ifeval", "inst_level_acc"),
    ]:
        values = series(rows, f"eval/harness/{task}/{metric}")
        assert sorted(values) == [0, 3], (task, metric, values)
        assert all(0.0 <= v <= 1.0 for v in values.values())
    assert "lm-eval at step 3" in proc.stdout + proc.stderr
    # Each evaluation's results and per-item outputs are kept; every generated answer is there.
    summary = json.loads((out / "harness" / "step_000003.json").read_text())
    assert summary["n-samples"]["fullft_general"]["effective"] == LIMIT
    chat = [json.loads(line) for line in (out / "harness" / "step_000003_chat_samples.jsonl").open()]
    assert len(chat) == LIMIT and all(isinstance(r["filtered_resps"][0], str) for r in chat)
    # The prompt went through the chat template (lm_eval --apply_chat_template).
    assert "<|user|>" in json.dumps(chat[0]["arguments"]) and "<|assistant|>" in json.dumps(chat[0]["arguments"])
    assert (out / "dashboard.png").exists()


def _lm_eval_cli(out, tmp_path, tasks, *extra):
    env = {**os.environ, **THREADS, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [str(BIN / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={out / 'hf'},dtype=float32",
         "--tasks", ",".join(tasks), "--include_path", str(ROOT / "trainer" / "harness_tasks"), "--limit", str(LIMIT),
         "--device", "cpu", "--batch_size", "16", "--output_path", str(tmp_path), "--log_samples", *extra],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(tmp_path.rglob("results_*.json")).read_text())["results"]
    samples = {}
    for path in tmp_path.rglob("samples_*.jsonl"):
        task = next(t for t in tasks if f"samples_{t}_" in path.name)
        for line in path.open():
            r = json.loads(line)
            samples[(task, r["doc_id"])] = r["filtered_resps"]
    return results, samples


def _ours(out, name):
    mine = {}
    for line in (out / "harness" / name).open():
        r = json.loads(line)
        mine[(r["task"], r["doc_id"])] = r["filtered_resps"]
    return mine


def test_loglikelihood_tasks_equal_lm_eval_cli_on_the_export(harness_run, tmp_path):
    """Ours (2 ZeRO-3 ranks, packed rows, the chunked head) against lm-eval's CLI with its HF model
    class on the exported weights (one process, one request a row): the task metrics to 1e-6, each
    request's log-likelihood to 1e-5 relative (fp32 sums over different reductions), the greedy flags
    exactly."""
    out, _ = harness_run
    theirs, their_samples = _lm_eval_cli(out, tmp_path, TASKS)
    rows = read_metrics(out)
    for task in TASKS:
        for metric in ("acc", "acc_norm"):
            assert series(rows, f"eval/harness/{task}/{metric}")[3] == pytest.approx(
                theirs[task][f"{metric},none"], abs=1e-6
            ), (task, metric)
    mine = _ours(out, "step_000003_samples.jsonl")
    assert len(their_samples) == len(mine) == LIMIT * len(TASKS)
    for key, resps in their_samples.items():
        for (ll, greedy), (ll_hf, greedy_hf) in zip(mine[key], resps, strict=True):
            assert float(ll) == pytest.approx(float(ll_hf), rel=1e-5, abs=1e-5), key
            assert str(greedy) == str(greedy_hf), key


def test_instruction_following_answers_equal_lm_eval_cli_on_the_export(harness_run, tmp_path):
    """The chat task's greedy answers (through the chat template, cut at the end-of-sequence token) are
    lm-eval's HF model's, word for word, and so is the score. Both generate the 12 prompts as one
    left-padded batch."""
    out, _ = harness_run
    theirs, their_samples = _lm_eval_cli(
        out, tmp_path, ["fullft_ifeval"], "--apply_chat_template", "--gen_kwargs", "max_gen_toks=16"
    )
    mine = _ours(out, "step_000003_chat_samples.jsonl")
    assert len(their_samples) == len(mine) == LIMIT
    assert {k: v[0] for k, v in mine.items()} == {k: v[0] for k, v in their_samples.items()}
    assert series(read_metrics(out), "eval/harness/fullft_ifeval/prompt_level_acc")[3] == pytest.approx(
        theirs["fullft_ifeval"]["prompt_level_acc,none"], abs=1e-6
    )


def test_unknown_task_stops_before_the_model_is_built(tmp_path):
    proc = run_train("python", ["eval.harness.tasks=[no_such_task]", f"output_dir={tmp_path}"])
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "unknown lm-eval task(s) ['no_such_task']" in err and "fullft_general" in err
    assert not (tmp_path / "checkpoints").exists()
