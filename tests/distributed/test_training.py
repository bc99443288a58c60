"""Distributed tier: real DeepSpeed ZeRO-3 runs with 2 CPU ranks over gloo, through the real entry
point and launchers. Slow (~20 s a run); marked `distributed`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (
    LAUNCHER,
    ONE_RANK,
    QUICK,
    ROOT,
    STRAIGHT,
    check,
    launcher_cmd,
    read_metrics,
    run_train,
    series,
    shm_buffers_left,
)

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]


def test_loss_decreases_and_outputs_are_complete(straight_run):
    out, proc = straight_run
    rows = read_metrics(out)
    loss = series(rows, "train/loss")
    assert sorted(loss) == list(range(1, 21))
    assert sum(list(loss.values())[-5:]) / 5 < 0.8 * sum(list(loss.values())[:3]) / 3
    evals = series(rows, "eval/domain/loss")
    assert sorted(evals) == [0, 10, 20] and evals[20] < evals[0]
    for key in (
        "train/lr",
        "train/grad_norm",
        "train/tokens_seen",
        "perf/tokens_per_s",
        "perf/peak_mem_gb",
        "data/packing_efficiency",
        "eval/domain/ppl",
    ):
        assert any(key in r for r in rows), key
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "checkpoints/latest",
        "hf/config.json",
        "hf/model.safetensors",
        "hf/tokenizer.json",
        "hf/chat_template.jinja",
    ):
        assert (out / name).exists(), name
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb")), "no offline W&B run"
    assert not [p.name for p in (out / "hf").iterdir() if p.suffix in (".bin", ".pt", ".pkl")], "pickled export"
    assert (out / "checkpoints/latest").read_text() == "step_00000020"
    assert not shm_buffers_left(proc.args), "DeepSpeed's /dev/shm all-reduce buffers outlived the run"
    # saved at 5, 10, 15, 20; keep_last=2 pruned the first two; what is kept is complete
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000015", "step_00000020"]
    assert all((out / "checkpoints" / t / "COMPLETE").exists() for t in ("step_00000015", "step_00000020"))
    # every rank logged the same config hash
    hashes = {
        line.split("config hash ")[1].split()[0]
        for line in (proc.stdout + proc.stderr).splitlines()
        if "config hash" in line
    }
    assert len(hashes) == 1 and (proc.stdout + proc.stderr).count("config hash") >= 2


def _logits_from(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


def test_export_reloads_with_the_trained_weights(straight_run):
    """hf/ loads with AutoModelForCausalLM and gives the same logits as the trained ZeRO-3 weights
    (consolidated from the final DeepSpeed checkpoint with DeepSpeed's own tool)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out, _ = straight_run
    exported = AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    live = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out / "hf"))
    live.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step_00000020"))
    live.eval()
    tok = AutoTokenizer.from_pretrained(out / "hf")
    tokens = torch.tensor([tok("The patient presented with chest pain and shortness of breath.")["input_ids"]])
    assert torch.allclose(_logits_from(exported, tokens), _logits_from(live, tokens), atol=1e-5)
    assert tok.pad_token_id != tok.eos_token_id and tok.chat_template


def test_sigkill_of_one_rank_ends_the_job_and_rerun_resumes_exactly(straight_run, tmp_path):
    out = tmp_path / "killed"
    args = launcher_cmd("deepspeed") + STRAIGHT + [f"output_dir={out}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    launcher = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and '"step": 12,' in metrics.read_text()):
        assert launcher.poll() is None, launcher.stdout.read()
        time.sleep(0.05)
    victim = subprocess.run(
        ["pgrep", "-f", f"local_rank=1.*output_dir={out}"], capture_output=True, text=True
    ).stdout.split()
    assert victim, "rank 1 not found"
    os.kill(int(victim[0]), signal.SIGKILL)
    killed_at = time.time()
    rc = launcher.wait(timeout=120)
    assert rc != 0
    assert time.time() - killed_at < 60
    survivors = subprocess.run(["pgrep", "-f", f"output_dir={out}"], capture_output=True, text=True).stdout.split()
    assert not survivors, f"processes still alive after the kill: {survivors}"
    assert not shm_buffers_left(args), "a killed run left DeepSpeed's all-reduce buffers in /dev/shm"
    assert (out / "checkpoints/latest").read_text() == "step_00000010"

    check(run_train("deepspeed", STRAIGHT + [f"output_dir={out}"]))  # the same command again
    rows = read_metrics(out)
    assert_same_steps(rows, read_metrics(straight_run[0]))


# Equal per step: the loss and gradient norm (the same weights and optimizer state), the learning
# rate (the scheduler's position), and the token counts and packing (the same rows in each step).
SAME = (
    "train/loss",
    "train/grad_norm",
    "train/lr",
    "train/tokens_seen",
    "train/supervised_tokens_seen",
    "data/packing_efficiency",
)


def assert_same_steps(rows, ref_rows, first: int = 1, last: int = 20) -> None:
    """A resumed run's metrics equal the straight run's, bit for bit on CPU, with no gap or duplicate
    step (2 ranks, micro 2 x accumulation 2, packed rows, past the first epoch)."""
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == list(range(first, last + 1)), "metrics.jsonl has a gap or a duplicate step"
    for key in SAME:
        ours, ref = series(rows, key), {s: v for s, v in series(ref_rows, key).items() if s >= first}
        assert ours == ref, f"{key} after resume differs from the straight run"


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.activation_checkpointing=every_n"],
        ["trainer.activation_checkpointing=full", "deepspeed=zero3_offload"],
    ],
    ids=["every_n", "full+offload"],
)
def test_checkpointing_and_offload_train_the_same_model(one_rank_run, tmp_path, overrides):
    """Activation checkpointing recomputes the same activations and CPU offload runs the same Adam
    (DeepSpeedCPUAdam): the per-step losses match the plain run. Full checkpointing and offload
    share one run: a fault in either would show in its losses."""
    check(run_train("python", ONE_RANK + overrides + [f"output_dir={tmp_path}"]))
    ours, ref = series(read_metrics(tmp_path), "train/loss"), series(read_metrics(one_rank_run[0]), "train/loss")
    assert sorted(ours) == [1, 2]
    for step in ours:
        assert abs(ours[step] - ref[step]) <= 1e-5 * ref[step], (step, ours[step], ref[step])


def test_launchers_and_batch_layouts_agree(straight_run, one_rank_run, tmp_path):
    """The same entry point under torchrun (2 ranks, micro 4 x accum 1) and python (1 rank, micro 8)
    trains on the same 8 rows per step as deepspeed (2 ranks x micro 2 x accum 2), so step 1's loss
    and gradient norm agree: the loss is normalised over the whole step."""
    ref = read_metrics(straight_run[0])
    torchrun = run_train(
        "torchrun",
        QUICK
        + [
            "trainer.max_steps=2",
            "trainer.micro_batch_size=4",
            "trainer.grad_accum_steps=1",
            f"output_dir={tmp_path}",
            "trainer.export_hf=false",
        ],
    )
    check(torchrun)
    for name, out in (("torchrun", tmp_path), ("python", one_rank_run[0])):
        rows = read_metrics(out)
        for key in ("train/loss", "train/grad_norm"):
            ours, theirs = series(rows, key)[1], series(ref, key)[1]
            assert abs(ours - theirs) <= 1e-4 * abs(theirs), (name, key, ours, theirs)
    assert "rank 0/1 config hash" in one_rank_run[1].stdout + one_rank_run[1].stderr
    assert "rank 1/2 config hash" in torchrun.stdout + torchrun.stderr


def test_tied_embeddings_export_keeps_the_tie(tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path / "qwen"
    check(run_train(LAUNCHER, QUICK + ["model=tiny_qwen2", "trainer.max_steps=3", f"output_dir={out}"]))
    model = AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    with safe_open(str(out / "hf" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())  # stored once
    live = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out / "hf"))
    state = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step_00000003")
    live.load_state_dict(state, strict=False)
    live.tie_weights()
    live.eval()
    tokens = torch.arange(1, 40).unsqueeze(0)
    assert torch.allclose(_logits_from(model, tokens), _logits_from(live, tokens), atol=1e-5)


# ---- resuming the reference runs elsewhere ------------------------------------------------------

TAG = "step_00000020"


def _copy_run(src: Path, dst: Path, *skip: str) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("wandb", *skip))
    return dst


def test_launch_export_makes_a_checkpoint_a_hugging_face_model_on_one_process(straight_run, tmp_path):
    """`python launch/export.py <checkpoint> <dir>` (the way on from any checkpoint, e.g. to start a
    new run from its weights) on one CPU process: the same logits as the run's own final export."""
    exported = tmp_path / "exported"
    subprocess.run(
        [sys.executable, "launch/export.py", str(straight_run[0] / "checkpoints" / TAG), str(exported)],
        cwd=ROOT,
        check=True,
        timeout=300,
        capture_output=True,
    )
    _same_logits(exported, straight_run[0] / "hf")


def _same_logits(a: Path, b: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    tokens = torch.arange(5, 60)[None]
    with torch.no_grad():
        la, lb = (AutoModelForCausalLM.from_pretrained(p).eval()(input_ids=tokens).logits for p in (a, b))
    assert torch.allclose(la, lb, atol=1e-5), (la - lb).abs().max()


@pytest.mark.timeout(600)
def test_weights_given_and_a_checkpoint_resumed_in_one_run_warn(straight_run, tmp_path):
    # Without its export, the copy is not finished (trainer.checkpointing.checkpoint.finished_step): it resumes at
    # step 20, trains nothing and exports.
    out = _copy_run(straight_run[0], tmp_path / "run", "hf")
    proc = run_train(LAUNCHER, STRAIGHT + [f"output_dir={out}", f"model.name_or_path={straight_run[0]}/hf"])
    check(proc)
    assert (
        f"resuming at step 20: the weights come from the checkpoint, not from model.name_or_path={straight_run[0]}/hf"
    ) in (proc.stdout + proc.stderr)


def test_interpolation_with_the_start_scores_each_alpha_and_exports_the_chosen_one(straight_run, tmp_path):
    """regularizer.interpolation on 2 ZeRO-3 ranks, starting from the reference run's export: α = 0
    scores exactly as the start did at step 0 and α = 1 exactly as the last eval; the chosen α is the
    rule's on those rows; the export is θ0 + α(θ − θ0) with θ the final checkpoint's fp32 weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from trainer.forgetting.interpolation import choose

    start, out = straight_run[0] / "hf", tmp_path / "interp"
    # Trained on the held-out domain set itself, so that 3 steps surely lower its loss (a gain to keep).
    proc = run_train(
        LAUNCHER,
        QUICK
        + [
            f"model.name_or_path={start}",
            "trainer.max_steps=3",
            "trainer.micro_batch_size=2",
            "data.path=${bundled:medical_qa_heldout.jsonl}",
            "trainer.schedule.warmup_steps=1",
            "trainer.optim.lr=1e-3",
            "trainer.cadence.eval_every_steps=0",
            "regularizer.interpolation.alphas=[0,0.5]",
            "regularizer.interpolation.keep_gain=0.6",
            f"output_dir={out}",
        ],
    )
    check(proc)
    result = json.loads((out / "interpolation.json").read_text())
    rows = {r["alpha"]: r for r in result["rows"]}
    assert sorted(rows) == [0.0, 0.5, 1.0]
    metrics = read_metrics(out)
    step0, last = series(metrics, "eval/domain/loss")[0], series(metrics, "eval/domain/loss")[3]
    assert rows[0.0]["eval/domain/loss"] == pytest.approx(step0, rel=1e-6)
    assert rows[1.0]["eval/domain/loss"] == pytest.approx(last, rel=1e-6)
    assert rows[1.0]["eval/domain_gain"] > 0, rows
    chosen = choose(result["rows"], 0.6)["alpha"]
    assert result["alpha"] == f"{chosen:g}" and json.loads((out / "hf" / "interpolation.json").read_text()) == result
    assert series(metrics, "interpolation/alpha")[3] == chosen
    assert series(metrics, "interpolation/0.5/eval/domain/loss")[3] == rows[0.5]["eval/domain/loss"]

    theta = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step_00000003")
    theta0, exported = load_file(str(start / "model.safetensors")), load_file(str(out / "hf" / "model.safetensors"))
    assert set(exported) <= set(theta0)
    for name, value in exported.items():
        expected = torch.lerp(theta0[name].float(), theta[name].float(), chosen)
        assert torch.allclose(value.float(), expected, atol=1e-6), name
    assert chosen in (0.5, 1.0) and not torch.equal(exported["model.norm.weight"], theta0["model.norm.weight"])


def test_freezing_distillation_and_lines_on_zero3_resume_exactly_and_match_direct_computations(straight_run, tmp_path):
    """The forgetting controls that act during and after a stage, together on 2 ZeRO-3 ranks from the
    reference run's export (an untied model), 4 steps straight and 2 + 2 resumed:
    - regularizer.freeze.first_blocks=1: block 0 and the embeddings hold no optimizer state and keep
      the start (frozen weights are checked on resume: another freeze stops with a message);
    - regularizer.distill (λ 0.5, 2 rows a rank of general text): the teacher's stored top-k equal the
      start's full-logits top-k; reg/distill_penalty is 0 at step 1 (the model is its teacher) and at
      step 3 equals λ x the KL_k computed from full logits with the step-2 weights on the same rows;
    - regularizer.mft (τ 0.5): the stored top-k of the training rows hold each label; the loss of
      step 1 equals the KL from the corrected target, built from the start's full logits, to the start;
    - the resumed run matches the straight one step for step, penalty included;
    - the straight run exports LiNeS's (α, β) = (0, 1): λ(ℓ) = ℓ/(L−1), block 0 the start, the top the
      trained weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    start = straight_run[0] / "hf"
    common = QUICK + [
        f"model.name_or_path={start}",
        "trainer.micro_batch_size=2",
        "trainer.grad_accum_steps=1",
        "trainer.schedule.warmup_steps=1",
        "trainer.schedule.decay=constant",  # the same lr per step whatever max_steps is (the split run)
        "trainer.optim.lr=1e-3",
        "trainer.cadence.save_every_steps=2",
        "trainer.cadence.eval_every_steps=0",
        "regularizer.freeze.first_blocks=1",
        "regularizer.distill.weight=0.5",
        "regularizer.distill.data=${bundled:general_text.txt}",
        "regularizer.distill.objective=pretrain",
        "regularizer.distill.rows=2",
        "regularizer.mft.tau=0.5",
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    proc = run_train(
        LAUNCHER,
        common + ["trainer.max_steps=4", "regularizer.interpolation.alpha={alpha:0,beta:1}", f"output_dir={straight}"],
    )
    check(proc)
    assert "regularizer.freeze: blocks 0-0 and the token embeddings frozen" in proc.stdout + proc.stderr
    for steps in (2, 4):
        check(run_train(LAUNCHER, common + [f"trainer.max_steps={steps}", f"output_dir={split}"]))
    assert_same_steps(read_metrics(split), read_metrics(straight), last=4)  # steps 1-2, then 3-4 resumed
    penalty = series(read_metrics(straight), "reg/distill_penalty")
    assert series(read_metrics(split), "reg/distill_penalty") == penalty
    _check_distillation(proc.stdout + proc.stderr, start, straight, penalty, weight=0.5)
    _check_corrective_targets(proc.stdout + proc.stderr, start, series(read_metrics(straight), "train/loss")[1], 0.5)
    # a resume that would freeze other parameters stops, saying why and how to go on
    other = run_train(
        LAUNCHER, common + ["trainer.max_steps=6", "regularizer.freeze.first_blocks=2", f"output_dir={split}"]
    )
    assert other.returncode != 0
    assert "was trained with 10 tensors (model.embed_tokens.weight ... model.layers.0." in other.stdout + other.stderr
    assert "Set regularizer.freeze as the run that saved it had it" in other.stdout + other.stderr

    theta0 = load_file(str(start / "model.safetensors"))
    theta = get_fp32_state_dict_from_zero_checkpoint(str(straight / "checkpoints"), tag="step_00000004")
    resumed = get_fp32_state_dict_from_zero_checkpoint(str(split / "checkpoints"), tag="step_00000004")
    exported = load_file(str(straight / "hf" / "model.safetensors"))
    layers = int(json.loads((start / "config.json").read_text())["num_hidden_layers"])
    top = f"model.layers.{layers - 1}.mlp.up_proj.weight"
    for name in theta0:
        assert torch.equal(theta[name], resumed[name]), name  # the resume is exact, frozen or not
        frozen = name.startswith("model.layers.0.") or name == "model.embed_tokens.weight"
        assert torch.equal(theta[name].to(theta0[name].dtype), theta0[name]) == frozen, name
    assert torch.equal(exported["model.layers.0.mlp.up_proj.weight"], theta0["model.layers.0.mlp.up_proj.weight"])
    assert torch.allclose(exported[top].float(), theta[top].float(), atol=1e-6)  # λ(L-1) = 1
    # Adam's state: the trainable parameters only (both ranks' partitions together)
    states = [
        torch.load(p, weights_only=False)
        for p in sorted((straight / "checkpoints" / "step_00000004").glob("*optim_states.pt"))
    ]
    held = sum(g.numel() for s in states for g in s["optimizer_state_dict"]["fp32_flat_groups"])
    trainable = sum(
        v.numel()
        for n, v in theta0.items()
        if not (n.startswith("model.layers.0.") or n == "model.embed_tokens.weight")
    )
    assert held == trainable, (held, trainable)


def test_distillation_from_another_teacher_builds_it_alone_first(straight_run, tmp_path):
    """regularizer.distill.teacher=<the reference run's export> for a random-init student (one rank):
    the teacher gets an engine of its own before the student is built; its stored top-k are its
    full-logits top-k."""
    teacher = straight_run[0] / "hf"
    proc = run_train(
        "python",
        ONE_RANK
        + [
            "regularizer.distill.weight=1",
            "regularizer.distill.data=${bundled:general_text_heldout.txt}",  # not the other test's: computed here
            "regularizer.distill.objective=pretrain",
            f"regularizer.distill.teacher={teacher}",
            f"output_dir={tmp_path / 'kd'}",
        ],
        nproc=1,
    )
    check(proc)
    text = proc.stdout + proc.stderr
    assert text.index(f"building the teacher {teacher}") < text.index("parameters | world 1")
    _check_teacher_arrays(text, teacher)
    assert all(v > 0 for v in series(read_metrics(tmp_path / "kd"), "reg/distill_penalty").values())


def test_distillation_on_the_starts_own_answers_made_by_the_zero3_ranks(straight_run, tmp_path):
    """regularizer.distill.prompts from the reference run's export, 2 ZeRO-3 ranks: the ranks answer
    their share of the prompts in batches and gather them; the answers equal the export's own greedy
    answers made one prompt at a time in one process (launch/rehearse.py's way); the KL is on them;
    a second run from the same start reuses the stored answers."""
    import re

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.forgetting import rehearsal

    start = straight_run[0] / "hf"
    prompts = ["What is a river?", "Name a colour.", "Say hello.", "How do bees make honey?", "Why is the sea blue?"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    common = QUICK + [
        f"model.name_or_path={start}",
        "trainer.micro_batch_size=2",
        "trainer.export_hf=false",
        "regularizer.distill.weight=1",
        f"regularizer.distill.prompts={tmp_path / 'prompts.txt'}",
        "regularizer.distill.answer_tokens=8",
        "regularizer.distill.keep_cut_off=true",  # the tiny model seldom ends its turn within 8 tokens
        "regularizer.distill.answer_batch_size=2",  # 3 batches: rank 0 answers two, rank 1 one and a stand-in
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    proc = run_train(LAUNCHER, common + ["trainer.max_steps=2", f"output_dir={tmp_path / 'a'}"])
    check(proc)
    found = re.search(r"own answers to 5 prompts generated in .* -> (\S+)", proc.stdout + proc.stderr)
    assert found, (proc.stdout + proc.stderr)[-3000:]
    records = [json.loads(line) for line in Path(found.group(1)).read_text(encoding="utf-8").splitlines()]
    tok = AutoTokenizer.from_pretrained(start)
    model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
    alone = list(rehearsal.answers(model, tok, prompts, 8))
    assert records == [rehearsal.record(a) for a in alone if a.text]  # an empty answer is dropped
    assert len(records) >= 3
    assert all(v > 0 for k, v in series(read_metrics(tmp_path / "a"), "reg/distill_penalty").items() if k > 1)

    proc = run_train(LAUNCHER, common + ["trainer.max_steps=1", f"output_dir={tmp_path / 'b'}"])
    check(proc)
    assert f"own answers to 5 prompts, stored -> {found.group(1)}" in proc.stdout + proc.stderr


def _full_logprobs(model, src, idx):
    """`model`'s next-token log-probs [rows, seq - 1, V] (fp64, from full logits) on rows `idx` of the
    prepared source `src`, and their labels [rows, seq - 1]."""
    rows = src.rows(idx)
    with torch.no_grad():
        logits = model(
            input_ids=torch.from_numpy(rows["input_ids"]),
            position_ids=torch.from_numpy(rows["position_ids"]),
            use_cache=False,  # no cache: the position ids then keep packed documents apart
        ).logits[:, :-1]
    return torch.log_softmax(logits.double(), -1), torch.from_numpy(rows["labels"][:, 1:]).long()


def _coarse_kl(q_k: torch.Tensor, p_k: torch.Tensor) -> torch.Tensor:
    """KL between two distributions given over the same k classes, each with its rest as one more class."""
    q_r, p_r = (1 - q_k.sum(-1)).clamp_min(0), 1 - p_k.sum(-1)
    return (q_k * (q_k.log() - p_k.log())).sum(-1) + torch.where(q_r > 0, q_r * (q_r.log() - p_r.log()), 0.0)


def _check_teacher_arrays(log_text: str, teacher: Path):
    """The stored top-k (named by the run's log) against `teacher`'s full logits on the first rows."""
    import re

    from transformers import AutoModelForCausalLM

    from data_pipeline.prepare import Prepared

    where = Path(re.search(r"regularizer.distill: .*top-32 of \d+ rows computed once .* -> (\S+)", log_text).group(1))
    src = Prepared(where.parent.parent)
    ids, logq = np.load(where / "ids.npy"), np.load(where / "logp.npy")
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    logp_all, labels = _full_logprobs(model, src, list(range(4)))
    mask = labels != -100
    stored_ids, stored = torch.from_numpy(ids[:4]).long(), torch.from_numpy(logq[:4]).double()
    assert torch.allclose(stored[mask], torch.topk(logp_all, 32, dim=-1).values[mask], atol=1e-5)  # the k largest
    assert torch.allclose(logp_all.gather(-1, stored_ids)[mask], stored[mask], atol=1e-5)  # of these tokens
    return where, src, ids, logq, model


def _check_distillation(log_text: str, start: Path, out: Path, penalty: dict, weight: float) -> None:
    """The stored teacher against the start's full logits; the logged penalty of step 3 against the
    KL_k from full logits with the weights of the checkpoint of step 2, on the rows of step 3."""
    from types import SimpleNamespace

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from trainer.forgetting.distill import DistillSource

    where, src, ids, logq, model = _check_teacher_arrays(log_text, start)
    assert abs(penalty[1]) < 1e-6, penalty  # step 1: the model is its teacher

    model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step_00000002"))
    total, tokens = 0.0, 0
    for rank in range(2):
        idx = DistillSource(SimpleNamespace(rows_per_step=0), src, (ids, logq), 2, weight, rank, 2, 1234).indices(2)
        logp_all, labels = _full_logprobs(model, src, idx)
        mask = labels != -100
        q_ids, q = torch.from_numpy(ids[idx]).long(), torch.from_numpy(logq[idx]).double().exp()
        kl = _coarse_kl(q, logp_all.gather(-1, q_ids).exp())
        total, tokens = total + float(kl[mask].sum()), tokens + int(mask.sum())
    assert penalty[3] == pytest.approx(weight * total / tokens, rel=1e-5, abs=1e-9), (penalty, weight * total / tokens)


def _check_corrective_targets(log_text: str, start: Path, loss_step_1: float, tau: float) -> None:
    """regularizer.mft's stored top-k of the training rows against the start's full logits (each label
    among them, the others the start's best), and step 1's loss against the KL, coarsened to the
    stored classes, from the corrected target to the start, built directly from full logits."""
    import re

    from transformers import AutoModelForCausalLM

    from data_pipeline.loader import StepLoader
    from data_pipeline.prepare import Prepared

    pattern = r"regularizer.mft: the start's top-32 of (\d+) rows of source main computed once .* -> (\S+)"
    found = re.search(pattern, log_text)
    where = Path(found.group(2))
    src = Prepared(where.parent.parent)
    stored_rows, ids, logq = np.load(where / "rows.npy"), np.load(where / "ids.npy"), np.load(where / "logp.npy")
    assert len(stored_rows) == int(found.group(1)) == 16  # 4 steps x 4 rows: the rows the steps visit, not all 55
    model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32).eval()
    total, tokens = 0.0, 0
    for rank in range(2):
        idx = [row for _, row in StepLoader([src], [1.0], 2, 1, rank, 2, 1234).rows(0)[0]]
        logp_all, labels = _full_logprobs(model, src, idx)
        mask = labels != -100
        slots = np.searchsorted(stored_rows, idx)
        assert (stored_rows[slots] == idx).all()
        stored_ids, stored = torch.from_numpy(ids[slots]).long(), torch.from_numpy(logq[slots]).double()
        assert bool((stored_ids == labels[..., None]).any(-1)[mask].all())  # the label is always stored
        assert torch.allclose(logp_all.gather(-1, stored_ids)[mask], stored[mask], atol=1e-5)
        best = torch.topk(logp_all, 31, dim=-1).values
        assert torch.allclose(torch.sort(stored, -1, descending=True).values[..., :31][mask], best[mask], atol=1e-5)
        q = logp_all.exp()
        q_y = q.gather(-1, labels.clamp_min(0)[..., None])[..., 0]
        target = torch.where((q_y < tau)[..., None], q * ((1 - tau) / (1 - q_y))[..., None], q)
        target.scatter_(-1, labels.clamp_min(0)[..., None], torch.maximum(q_y, torch.full_like(q_y, tau))[..., None])
        kl = _coarse_kl(target.gather(-1, stored_ids), q.gather(-1, stored_ids))
        total, tokens = total + float(kl[mask].sum()), tokens + int(mask.sum())
    assert loss_step_1 == pytest.approx(total / tokens, rel=1e-5), (loss_step_1, total / tokens)
