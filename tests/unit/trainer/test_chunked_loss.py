"""Unit: chunked cross-entropy equals the full-logits path (fp32, 1e-5 relative) in the per-token loss
and in every gradient, for any chunk size, with label masks, fully masked rows and tied embeddings;
its weight gradient arrives once and dense (what ZeRO-3's reduce needs); the head override goes through
a real Hugging Face model (Llama untied, Qwen2 tied) and into every objective (token, dpo/ipo/simpo)."""

from __future__ import annotations

import types

import pytest
import torch

from data_pipeline.packing import IGNORE
from helpers import close, plain_token_nll
from trainer.objectives import head as loss_head
from trainer.objectives.chunked import auto_chunk, token_nll
from trainer.objectives.preference import PreferenceLoss
from trainer.objectives.token import TokenLoss, token_nll_from_logits


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_loss_and_gradients_equal_the_full_logits_for_any_chunk(chunk):
    torch.manual_seed(0)
    B, T, H, V = 3, 37, 16, 103
    weight = torch.nn.Parameter(torch.randn(V, H) * 0.3)
    hidden = torch.randn(B, T, H, requires_grad=True)
    targets = torch.randint(0, V, (B, T))
    targets[0, :10] = IGNORE  # a prompt
    targets[2] = IGNORE  # a fully masked row
    upstream = torch.randn(B, T)  # per-token weights, as DPO's non-uniform gradient

    def grads(fn):
        weight.grad, hidden.grad = None, None
        nll = fn(hidden, weight, targets)
        (nll * upstream).sum().backward()
        return nll.detach(), weight.grad.clone(), hidden.grad.clone()

    ref, got = grads(plain_token_nll), grads(lambda h, w, t: token_nll(h, w, t, chunk))
    assert close(got[0], ref[0]) and (got[0][2] == 0).all()
    assert close(got[1], ref[1]) and close(got[2], ref[2])
    # the gradients computed in the forward pass (uniform=True): exact for a uniform upstream, and a
    # non-uniform one (the caller broke its promise) still gets the recomputed, exact gradient
    upstream.fill_(0.37)
    ref, got = grads(plain_token_nll), grads(lambda h, w, t: token_nll(h, w, t, chunk, uniform=True))
    assert close(got[1], ref[1]) and close(got[2], ref[2])
    upstream.normal_()
    ref, got = grads(plain_token_nll), grads(lambda h, w, t: token_nll(h, w, t, chunk, uniform=True))
    assert close(got[1], ref[1]) and close(got[2], ref[2])


def test_the_weight_gradient_fires_once_dense_even_with_nothing_supervised():
    """ZeRO-3 reduces a parameter's gradient from its accumulate hook: once per backward, on every rank,
    even a rank whose micro-batch has no supervised token (else the ranks' reduce-scatters go out of step)."""
    weight = torch.nn.Parameter(torch.randn(11, 4))
    fires = []
    weight.register_post_accumulate_grad_hook(lambda p: fires.append(1))
    hidden = torch.randn(2, 5, 4, requires_grad=True)
    token_nll(hidden, weight, torch.full((2, 5), IGNORE), chunk=2).sum().backward()
    assert fires == [1] and weight.grad is not None and (weight.grad == 0).all()
    fires.clear()
    targets = torch.randint(0, 11, (2, 5))
    token_nll(hidden, weight, targets, chunk=1).sum().backward()  # 10 chunks, one gradient
    assert fires == [1]


def test_auto_chunk_bounds_the_logits_of_a_chunk():
    assert auto_chunk(8192, 128_256) == 512 and auto_chunk(8192, 49_152) == 1024  # 256 MiB of fp32 logits at most
    assert auto_chunk(300, 2048) == 512 and auto_chunk(1, 50) == 1  # never more than the tokens (next power of 2)


class _Engine:
    """What loss_head.score needs of a DeepSpeed engine: call it, and `.module`."""

    def __init__(self, model):
        self.module = model

    def __call__(self, **kw):
        return self.module(**kw)


def _model(kind: str, tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cls, cfg = (LlamaForCausalLM, LlamaConfig) if kind == "llama" else (Qwen2ForCausalLM, Qwen2Config)
    return cls(
        cfg(
            vocab_size=97,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=tied,
        )
    ).eval()


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (3, 24))
    labels = ids.clone()
    labels[:, :6] = IGNORE
    labels[1, 12] = IGNORE  # a document boundary
    document = torch.zeros_like(ids)
    document[:, 12:] = 1  # two documents a row: a pair (chosen, rejected)
    positions = torch.cat([torch.arange(12), torch.arange(12)]).repeat(3, 1)
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": positions,
        "document": document,
        "reference": torch.randn(3, 2, dtype=torch.float64) * 5 - 40,
    }


@pytest.mark.parametrize("kind, tied", [("llama", False), ("qwen2", True)])
@pytest.mark.parametrize(
    "objective",
    [TokenLoss(), PreferenceLoss("dpo", 0.1), PreferenceLoss("ipo", 0.1), PreferenceLoss("simpo", 2.0)],
    ids=["tokens", "dpo", "ipo", "simpo"],
)
def test_the_chunked_head_gives_every_objective_the_same_loss_and_gradients(kind, tied, objective):
    batch = _batch()
    plain, chunked = _model(kind, tied), _model(kind, tied)
    loss_head.install(chunked, 5)
    assert chunked.get_output_embeddings()._loss_chunk == 5
    results = []
    for model in (plain, chunked):
        nll = loss_head.score(_Engine(model), batch, torch.device("cpu"), uniform=objective.uniform)
        rows, _ = objective.rows(nll, batch)
        rows.sum().backward()
        results.append((rows.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert close(results[1][0], results[0][0])
    for name, g in results[0][1].items():
        assert close(results[1][1][name], g), name
    # unarmed, the head is a plain linear layer again (generation, the isolation probe)
    ids = batch["input_ids"][:1]
    assert torch.allclose(chunked(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_chunking_is_on_where_it_helps_and_off_where_the_logits_are_post_processed():
    llama = types.SimpleNamespace(model_type="llama", vocab_size=49_152, hidden_size=576)
    assert loss_head.chunking_for(llama, None) == 0 and loss_head.chunking_for(llama, 512) == 512
    assert loss_head.chunking_for(llama, 0) is None
    small_vocab = types.SimpleNamespace(model_type="llama", vocab_size=64, hidden_size=32)
    assert loss_head.chunking_for(small_vocab, None) is None
    gemma = types.SimpleNamespace(
        model_type="gemma2", vocab_size=256_000, hidden_size=2304, final_logit_softcapping=30.0
    )
    assert loss_head.chunking_for(gemma, None) is None and loss_head.chunking_for(gemma, 256) is None


def test_the_sum_of_the_per_token_losses_is_the_token_loss():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 9, 13), torch.randint(0, 13, (2, 9))
    labels[0, :4] = IGNORE
    nll = token_nll_from_logits(logits, labels)
    assert nll.shape == (2, 8) and (nll[0, :3] == 0).all()
    assert torch.allclose(TokenLoss().rows(nll, {"labels": labels})[0], nll.sum(1))
