"""Distributed tier: chunked cross-entropy (trainer.loss_chunk_tokens) under real DeepSpeed ZeRO-3 on 2
CPU ranks trains the model the plain full-logits path trains: per-step loss, gradient norm, EWC
penalty and eval losses equal (fp32, 1e-5 relative), with tied embeddings (the head's weight is the
embedding's, partitioned), gradient accumulation, EWC's Fisher pass and a DPO stage with its
reference pass. In the DPO case also Liger's fused linear cross-entropy as the chunks' kernel
(trainer.loss_kernel=liger), run through Triton's interpreter on these CPU ranks (TRITON_INTERPRET=1):
DPO's per-pair token weights make it recompute in backward, under ZeRO-3's gather of the head; its
token-mean path (gradients formed in forward) is checked through a tied Hugging Face head in
tests/unit/trainer/test_liger_loss.py (the interpreter costs ~10 ms a token: one case here)."""

from __future__ import annotations

import pytest

from helpers import QUICK, check, read_metrics, run_train, series

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

CASES = {
    # instruction tuning of the tied Qwen2 tiny model, micro 2 x accumulation 2, EWC (its Fisher pass)
    "instruct_tied_ewc": QUICK
    + [
        "model=tiny_qwen2",
        "regularizer=ewc",
        "regularizer.ewc.fisher_batches=2",
        "trainer.max_steps=3",
        "trainer.micro_batch_size=2",
        "trainer.grad_accum_steps=2",
        "trainer.cadence.eval_every_steps=3",
        "trainer.export_hf=false",
    ],
    # DPO of the untied Llama tiny model: reference pass, pair losses, held-out pairs
    "dpo": [
        "stage=dpo",
        "data=medical_prefs",
        "+eval.sets.prefs=${bundled:medical_prefs_heldout.jsonl}",
        "logger=jsonl",
        "logger.dashboard=false",
        "trainer.cadence.log_every_steps=1",
        "trainer.schedule.warmup_steps=1",
        "trainer.optim.lr=5e-4",
        "trainer.max_steps=3",
        "trainer.micro_batch_size=2",
        "trainer.cadence.eval_every_steps=3",
        "trainer.export_hf=false",
    ],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_chunked_and_full_logits_train_the_same_model(case, tmp_path):
    runs = {}
    variants = ("null", "liger") if case == "dpo" else ("null",)
    for chunk in ("0",) + variants:
        out = tmp_path / f"chunk_{chunk}"
        kernel = ["trainer.loss_kernel=liger"] if chunk == "liger" else ["trainer.loss_kernel=torch"]
        proc = run_train(
            "torchrun",
            CASES[case]
            + kernel
            + [
                f"trainer.loss_chunk_tokens={'null' if chunk == 'liger' else chunk}",
                f"output_dir={out}",
                f"data.cache_dir={tmp_path / 'cache' / chunk}",
            ],
            env={"TRITON_INTERPRET": "1"} if chunk == "liger" else None,
        )
        check(proc)
        log = proc.stdout + proc.stderr
        assert ("chunked cross-entropy" in log) == (chunk != "0")
        assert ("on Liger's fused linear cross-entropy kernel" in log) == (chunk == "liger")
        runs[chunk] = read_metrics(out)
    keys = ["train/loss", "train/grad_norm"] + (
        ["reg/ewc_penalty", "eval/domain/loss"]
        if "ewc" in case
        else ["rewards/margins", "eval/prefs/loss", "eval/prefs/rewards/margins"]
    )
    for key, variant in ((k, v) for k in keys for v in variants):
        plain, chunked = series(runs["0"], key), series(runs[variant], key)
        assert plain and sorted(plain) == sorted(chunked), (key, variant)
        for step in plain:
            # 1e-5 relative; rewards near 0 (step 1: policy = reference) to 1e-4 absolute: each run scores its
            # own reference (its own cache), a log-prob of ~-400 in fp32 summed in another order
            assert abs(chunked[step] - plain[step]) <= max(
                1e-5 * abs(plain[step]), 1e-4 if "rewards" in key else 1e-9
            ), (key, variant, step, chunked[step], plain[step])
