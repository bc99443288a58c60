"""Unit: parity with TRL itself (trl>=1.16: a test dependency, the `dev` extra; never the trainer's).

One tiny random-init Llama (fp32), a reference model that differs from it (so the log-ratios are not
zero) and a handful of preference pairs, trained here and in TRL:

  here  pairs prepared by data_pipeline (normalise_pair -> encode_pair -> write_pairs: whole pairs
        packed into rows, each document with its own positions), the reference's per-document
        log-probs scored once by trainer/objectives/reference.py, the loss of PreferenceLoss.rows summed over
        rows and divided by the pairs, as train_step does;
  TRL   the same pairs through DPOTrainer (dpo = loss_type "sigmoid", ipo) or CPOTrainer (simpo:
        TRL's SimPO, cpo_alpha=0): its own tokenization, collator, padded rows and live reference model.

Checked: the same tokens, the same loss (relative 1e-5), the same gradient of every policy parameter
(||g_ours - g_trl|| <= 1e-4 ||g_trl||, per parameter) and the same logged metrics (TRL's
rewards/* and logps/*, ours being row_stats summed over rows / pairs). No network: models and our
tokenizer are passed as objects. ~12 s on 2 cores, a third of it importing TRL.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from datasets import Dataset  # noqa: E402  (TRL's own dependency)

from data_pipeline.preference import encode_pair, normalise_pair  # noqa: E402
from data_pipeline.prepare import PrepareOptions, prepare  # noqa: E402
from data_pipeline.sources import Record  # noqa: E402
from trainer.objectives import reference as reference_module  # noqa: E402
from trainer.objectives.preference import STATS, PreferenceLoss  # noqa: E402
from trainer.objectives.token import token_nll_from_logits  # noqa: E402

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
S = lambda text: {"role": "system", "content": text}  # noqa: E731

# Conversational pairs of different lengths (a system turn, a multi-turn prompt, a two-turn completion)
# so rows pack several pairs each and completions differ in token counts (ipo and simpo divide by them).
CONVERSATIONS = [
    {
        "prompt": [U("What is a fever?")],
        "chosen": [A("A body temperature above 38 C.")],
        "rejected": [A("A kind of rash.")],
    },
    {
        "prompt": [S("You are a careful clinician."), U("How is asthma treated?")],
        "chosen": [A("With an inhaled steroid to prevent attacks and a reliever inhaler for symptoms.")],
        "rejected": [A("It is not treated.")],
    },
    {
        "prompt": [U("I have a cough."), A("For how long?"), U("Two weeks.")],
        "chosen": [A("See a doctor if it lasts three weeks or you cough blood.")],
        "rejected": [A("Ignore it.")],
    },
    {
        "prompt": [U("Should I take antibiotics for a cold?")],
        "chosen": [A("No: colds are viral, and antibiotics do not help.")],
        "rejected": [A("Yes, always, as early as possible and for as long as you can.")],
    },
    {
        "prompt": [U("What does a high blood sugar mean?")],
        "chosen": [A("It can mean diabetes; get tested.")],
        "rejected": [A("Nothing at all.")],
    },
]

TEXTS = [
    {"prompt": "Question: what is a fever?\nAnswer:", "chosen": " A temperature above 38 C.", "rejected": " A rash."},
    {
        "prompt": "Question: how is asthma treated?\nAnswer:",
        "chosen": " With a steroid inhaler and a reliever inhaler.",
        "rejected": " It is not.",
    },
    {
        "prompt": "Question: do antibiotics cure a cold?\nAnswer:",
        "chosen": " No, colds are viral.",
        "rejected": " Yes, always, and the more the better.",
    },
    {"prompt": "Question: what is hypertension?\nAnswer:", "chosen": " High blood pressure.", "rejected": " Low mood."},
]

SEQ_LEN = 128  # room for 2-3 of these pairs a row: several rows, several pairs in each


def _models(vocab: int):
    """The policy and a reference that differs from it: the policy's weights, perturbed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # initializer_range 0.1 (not 0.02): logits far from uniform, so log-probs differ token to token
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.1,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    policy = LlamaForCausalLM(config).float()
    reference = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return policy, reference.eval()


class _Engine:
    """The face of a DeepSpeed engine that trainer/objectives/reference.py's scoring pass uses."""

    def __init__(self, module):
        self.module = module

    def __call__(self, **kwargs):
        return self.module(**kwargs)

    def eval(self):
        self.module.eval()

    def train(self):
        self.module.train()


def _ours(tmp_path, monkeypatch, tokenizer, records, policy, reference, objective):
    """Our loss (train_step's: row losses summed / pairs), metrics (summed / pairs) and gradients."""
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    prepared = prepare(
        str(src), tokenizer, PrepareOptions(objective="dpo", seq_len=SEQ_LEN, packing=True), str(tmp_path / "cache")
    )
    assert prepared.stats["pairs"] == len(records)
    # packing is exercised: more than one row, and rows holding more than one pair
    assert len(prepared) > 1 and prepared.documents_per_row >= 4
    if objective.needs_reference:
        # trainer/objectives/reference.py's own pass, on one rank (its all-reduce over ranks is then the identity)
        monkeypatch.setattr(reference_module.distributed, "all_reduce_sum", lambda t: t)
        prepared.reference = reference_module._score(
            _Engine(reference), prepared, micro_batch_size=2, rank=0, world_size=1, device=torch.device("cpu")
        )
    batch = {k: torch.from_numpy(np.asarray(v)) for k, v in prepared.rows(np.arange(len(prepared))).items()}
    policy.zero_grad()
    # as train_step: input_ids and per-document position_ids, no attention mask
    logits = policy(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    rows, row_stats = objective.rows(token_nll_from_logits(logits, batch["labels"]), batch)
    pairs = objective.count(batch)
    assert pairs == len(records)
    loss = rows.sum() / pairs
    loss.backward()
    metrics = dict(zip(STATS, (row_stats.sum(0) / pairs).tolist()))
    return loss.item(), metrics, _grads(policy)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _assert_same(ours, theirs, trl_metrics):
    """Loss within 1e-5 relative; every parameter's gradient within 1e-4 of its norm; the metrics."""
    loss, metrics, grads = ours
    trl_loss, trl_grads = theirs
    assert loss == pytest.approx(trl_loss, rel=1e-5, abs=0)
    assert grads.keys() == trl_grads.keys()
    compared = 0
    for name, g in grads.items():
        t = trl_grads[name]
        if not g.any() and not t.any():
            continue
        compared += 1
        assert (g - t).norm() <= 1e-4 * t.norm(), f"{name}: {(g - t).norm() / t.norm():.2e} relative"
    assert compared == len(grads)  # no parameter is left out of the comparison
    for key in STATS:
        # TRL's log-probs are fp32 sums of ~20 tokens (~-100): their last bit is ~1e-5
        assert metrics[key] == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-5), key


DPO_CASES = {
    # our loss, TRL's loss_type (and weights), label smoothing, pairs
    "dpo": ("dpo", ["sigmoid"], None, 0.0, CONVERSATIONS),
    "dpo_text": ("dpo", ["sigmoid"], None, 0.0, TEXTS),
    # TRL 1.x's "sigmoid" ignores label_smoothing (only "robust", "exo_pair", "aot" read it); our ε is
    # conservative DPO, −(1−ε)·log σ(βh) − ε·log σ(−βh) (TRL 0.x's sigmoid), which is this sum of TRL's
    # own terms: 2(1−ε)·sigmoid − (1−2ε)·robust, robust being (−(1−ε)·log σ(βh) + ε·log σ(−βh))/(1−2ε).
    "dpo_label_smoothing": ("dpo", ["sigmoid", "robust"], [2 * (1 - 0.1), -(1 - 2 * 0.1)], 0.1, CONVERSATIONS),
    "ipo": ("ipo", ["ipo"], None, 0.0, CONVERSATIONS),
}


@pytest.mark.parametrize("case", list(DPO_CASES))
def test_dpo_and_ipo_match_trls_dpo_trainer(tmp_path, monkeypatch, tiny_tokenizer, case):
    from trl import DPOConfig, DPOTrainer

    loss, loss_type, loss_weights, label_smoothing, records = DPO_CASES[case]
    beta = 0.1
    policy, reference = _models(len(tiny_tokenizer))
    trl_policy = copy.deepcopy(policy)  # TRL patches the model it gets (its fused LM head): its own copy
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        use_cpu=True,
        report_to=[],
        seed=0,
        bf16=False,  # TRL's configs default to bf16; this comparison is fp32
        beta=beta,
        loss_type=loss_type,
        loss_weights=loss_weights,
        label_smoothing=label_smoothing,
        precompute_ref_log_probs=False,
        per_device_train_batch_size=len(records),
        max_length=None,
        disable_dropout=True,
    )
    trainer = DPOTrainer(
        model=trl_policy,
        ref_model=copy.deepcopy(reference),
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=copy.deepcopy(tiny_tokenizer),
    )

    # The same tokens: TRL's prompt_ids/chosen_ids/rejected_ids are our encode_pair's
    for i, record in enumerate(records):
        row = trainer.train_dataset[i]
        ours = encode_pair(tiny_tokenizer, normalise_pair(Record(record, f"pairs.jsonl:{i + 1}")))
        assert ours == (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]), i

    batch = next(iter(trainer.get_train_dataloader()))  # TRL's collator: all pairs, padded, one batch
    assert batch["input_ids"].shape[0] == 2 * len(records)
    trl_policy.train()  # as in training: the metrics land in _metrics["train"] (there is no dropout)
    trl_loss = trainer.compute_loss(trl_policy, batch)
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    ours = _ours(
        tmp_path,
        monkeypatch,
        tiny_tokenizer,
        records,
        policy,
        reference,
        PreferenceLoss(loss, beta=beta, label_smoothing=label_smoothing),
    )
    assert trl_metrics["rewards/chosen"] != 0.0  # the reference differs from the policy
    _assert_same(ours, (trl_loss.item(), _grads(trl_policy)), trl_metrics)


def test_simpo_matches_trls_cpo_trainer(tmp_path, monkeypatch, tiny_tokenizer):
    """TRL's SimPO is CPOTrainer with loss_type=simpo and cpo_alpha=0 (DPOTrainer has none): mean
    token log-probs, no reference model."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    beta, gamma, label_smoothing = 2.0, 0.8, 0.1
    records = CONVERSATIONS
    policy, _ = _models(len(tiny_tokenizer))
    trl_policy = copy.deepcopy(policy)
    # CPOTrainer's tokenizer (TRL's older one) prepends BOS to every prompt when the tokenizer has one;
    # DPOTrainer and ours take the chat template's tokens as they are (this template has no BOS). Its
    # copy of the tokenizer has no BOS, so both sides see the same tokens (checked below).
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.bos_token = None
    args = CPOConfig(
        output_dir=str(tmp_path / "trl"),
        use_cpu=True,
        report_to=[],
        seed=0,
        bf16=False,
        loss_type="simpo",
        cpo_alpha=0.0,
        beta=beta,
        simpo_gamma=gamma,
        label_smoothing=label_smoothing,
        per_device_train_batch_size=len(records),
        max_length=1024,
        remove_unused_columns=False,
        disable_dropout=True,
    )
    trainer = CPOTrainer(
        model=trl_policy, args=args, train_dataset=Dataset.from_list(records), processing_class=tokenizer
    )

    for i, record in enumerate(records):
        row = trainer.train_dataset[i]
        prompt, chosen, rejected = encode_pair(tiny_tokenizer, normalise_pair(Record(record, f"pairs.jsonl:{i + 1}")))
        assert row["chosen_input_ids"] == prompt + chosen and row["rejected_input_ids"] == prompt + rejected, i
        assert row["chosen_labels"] == [-100] * len(prompt) + chosen, i

    batch = next(iter(trainer.get_train_dataloader()))
    trl_policy.train()
    trl_loss = trainer.compute_loss(trl_policy, batch)
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}

    ours = _ours(
        tmp_path,
        monkeypatch,
        tiny_tokenizer,
        records,
        policy,
        None,
        PreferenceLoss("simpo", beta=beta, label_smoothing=label_smoothing, simpo_gamma=gamma),
    )
    _assert_same(ours, (trl_loss.item(), _grads(trl_policy)), trl_metrics)
