"""The real model on 2 ranks with real DeepSpeed ZeRO-3 (gloo, CPU): one training launch of the
depth-reduced SmolLM2 copy (real embeddings, tokenizer and ChatML template) on the bundled medical QA
pairs, shared by every assertion here, plus one resumed launch. Each launch costs ~1-2 minutes on 2
shared cores, hence so few of them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import LAUNCHER, QUICK, check, read_metrics, run_train, series

pytestmark = [pytest.mark.real_model, pytest.mark.distributed, pytest.mark.timeout(1200)]

STEPS, SAVE_EVERY = 6, 3
FINAL_TAG = f"step_{STEPS:08d}"
# micro 2 x 2 ranks of 128-token rows: the cost of a step is mostly ZeRO-3 gathering the 28M-element
# tied embedding over gloo, so fewer, wider micro-batches are cheaper than accumulation.
PROMPTS = "['How is atrial fibrillation treated?','What advice would you give a patient with asthma?']"
REAL = QUICK + [
    "data.seq_len=128",
    "trainer.micro_batch_size=2",
    "trainer.grad_accum_steps=1",
    f"trainer.max_steps={STEPS}",
    f"trainer.cadence.save_every_steps={SAVE_EVERY}",
    f"trainer.cadence.eval_every_steps={STEPS}",
    "trainer.schedule.warmup_steps=2",
    "trainer.optim.lr=3e-4",
    "eval.at_start=false",
    f"eval.sample_prompts={PROMPTS}",
    "eval.sample_max_new_tokens=8",
]
# Equal per step after a resume: the same weights and optimizer state, scheduler position and rows.
SAME = ("train/loss", "train/grad_norm", "train/lr", "train/tokens_seen", "data/packing_efficiency")


def overrides(reduced_dir, out):
    return REAL + [f"model.name_or_path={reduced_dir}", f"output_dir={out}"]


@pytest.fixture(scope="module")
def real_run(reduced_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("real_run")
    check(run_train(LAUNCHER, overrides(reduced_dir, out), timeout=900))
    return out


def test_loss_falls(real_run):
    loss = series(read_metrics(real_run), "train/loss")
    assert sorted(loss) == list(range(1, STEPS + 1))
    first, last = (loss[1] + loss[2]) / 2, (loss[STEPS - 1] + loss[STEPS]) / 2
    assert last < 0.9 * first, loss


def test_export_keeps_the_real_vocabulary_tie_and_template(real_run, reduced_dir):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = real_run / "hf"
    model = AutoModelForCausalLM.from_pretrained(hf)
    assert model.get_input_embeddings().num_embeddings == model.config.vocab_size == 49_152  # never grown
    assert (
        model.config.tie_word_embeddings and model.get_output_embeddings().weight is model.get_input_embeddings().weight
    )
    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())  # stored once, as the base model ships it
    tok, base = AutoTokenizer.from_pretrained(hf), AutoTokenizer.from_pretrained(reduced_dir)
    assert len(tok) == 49_152 and tok.chat_template == base.chat_template and tok.eos_token == "<|im_end|>"
    assert tok.get_vocab() == base.get_vocab()


def _generate(model, tok, prompts, max_new_tokens):
    """The trainer's sample generation (trainer/observability/generation.py) on one process: the same rendering,
    left padding and greedy decoding, without ZeRO-3's synced_gpus."""
    from trainer.observability.generation import Generator

    ids = [Generator(prompts, max_new_tokens, tok, chat=True).render(p) for p in prompts]
    width = max(len(i) for i in ids)
    pad = tok.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad,
            eos_token_id=tok.eos_token_id,
        )
    completions = []
    for row in out[:, width:].tolist():
        row = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
        completions.append(tok.decode(row, skip_special_tokens=True))
    return completions


def test_export_equals_the_live_model_in_logits_and_greedy_generations(real_run, reduced_dir):
    """hf/ against the trained weights: the final ZeRO-3 checkpoint consolidated by DeepSpeed's own
    tool (logits), and the generations the live sharded model wrote at its final eval (samples.jsonl)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.config import ModelConfig
    from trainer.engine.tokenizer import load_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran (OMP_NUM_THREADS=1): the same summation order
    try:
        exported = AutoModelForCausalLM.from_pretrained(real_run / "hf", dtype=torch.float32).eval()
        live = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(real_run / "hf"), dtype=torch.float32)
        live.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(real_run / "checkpoints"), tag=FINAL_TAG))
        live.eval()
        base = AutoModelForCausalLM.from_pretrained(reduced_dir, dtype=torch.float32).eval()
        tok = load_tokenizer(ModelConfig(name_or_path=str(real_run / "hf")))
        text = tok.apply_chat_template(
            [
                {"role": "user", "content": "What is the first-line treatment of asthma?"},
                {"role": "assistant", "content": "An inhaled corticosteroid."},
            ],
            tokenize=False,
        )
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = {
                name: m(input_ids=ids, use_cache=False).logits
                for name, m in (("exported", exported), ("live", live), ("base", base))
            }
        assert torch.allclose(logits["exported"], logits["live"], atol=1e-5)
        assert (logits["exported"] - logits["base"]).abs().max() > 1e-2  # training did change the model

        samples = [json.loads(line) for line in (real_run / "samples.jsonl").read_text().splitlines()]
        final = [s for s in samples if s["step"] == STEPS]
        assert final, samples
        prompts = [s["prompt"] for s in final]
        assert _generate(exported, tok, prompts, max_new_tokens=8) == [s["completion"] for s in final]
    finally:
        torch.set_num_threads(threads)


def test_resume_reproduces_the_straight_run(real_run, reduced_dir, tmp_path):
    """The run stopped after its step-3 checkpoint (a copy of it without what came later), resumed by
    the same command: steps 4-6 equal the straight run's, bit for bit, and so does the export. (A kill
    at an exact point is covered on the tiny model by tests/distributed; here one launch is saved.)"""
    from safetensors.torch import load_file

    out = tmp_path / "resumed"
    shutil.copytree(real_run, out, ignore=shutil.ignore_patterns("hf", FINAL_TAG, "wandb"))
    (out / "checkpoints" / "latest").write_text(f"step_{SAVE_EVERY:08d}")
    proc = run_train(LAUNCHER, overrides(reduced_dir, out), timeout=900)
    check(proc)
    assert f"at step {SAVE_EVERY}" in proc.stdout + proc.stderr
    rows, straight = read_metrics(out), read_metrics(real_run)
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, STEPS + 1))
    for key in SAME:
        assert series(rows, key) == series(straight, key), f"{key} after resume differs from the straight run"
    ours, ref = load_file(out / "hf" / "model.safetensors"), load_file(real_run / "hf" / "model.safetensors")
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
