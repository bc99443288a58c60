"""Unit: Liger's fused linear cross-entropy (trainer.loss_kernel=liger, the GPU kernel of the chunked
cross-entropy) equals the full-logits path and the torch kernel (fp32, 1e-5 relative) in the per-token
loss and every gradient: uniform upstream (its gradients formed in forward), per-token upstream (DPO's:
recomputed in backward), masks, nothing supervised (the weight's gradient still fires once, dense);
through a real Hugging Face model's head; and the kernel choice says why where Liger cannot run.

Liger's Triton kernels run here through Triton's interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before anything imports liger-kernel), the real kernels on CPU tensors; on a GPU
they compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.packing import IGNORE
from helpers import close, plain_token_nll
from trainer.objectives import chunked as chunked_loss
from trainer.objectives import head as loss_head
from trainer.objectives.chunked import token_nll


@pytest.fixture(autouse=True, scope="module")
def liger_runs_here():
    pytest.importorskip("liger_kernel.ops.fused_linear_cross_entropy", reason="the dev extra installs liger-kernel")
    assert chunked_loss.liger_problem() is None, chunked_loss.liger_problem()


def _grads(fn, hidden, weight, targets, upstream):
    weight.grad, hidden.grad = None, None
    nll = fn(hidden, weight, targets)
    (nll * upstream).sum().backward()
    return nll.detach(), weight.grad.clone(), hidden.grad.clone()


def test_liger_equals_the_full_logits_and_the_torch_kernel():
    """(Triton's interpreter takes ~50 ms a token: the sizes are small; 19 tokens in 2 chunks.)"""
    torch.manual_seed(0)
    B, T, H, V, chunk = 2, 15, 16, 130, 16
    weight = torch.nn.Parameter(torch.randn(V, H) * 0.3)
    hidden = torch.randn(B, T, H, requires_grad=True)
    targets = torch.randint(0, V, (B, T))
    targets[0, :8] = IGNORE  # a prompt
    targets[1, -3:] = IGNORE  # padding
    liger = lambda h, w, t, **kw: token_nll(h, w, t, chunk, kernel="liger", **kw)  # noqa: E731
    for upstream in (torch.randn(B, T), torch.full((B, T), 0.37)):
        ref = _grads(plain_token_nll, hidden, weight, targets, upstream)
        torch_kernel = _grads(
            lambda h, w, t: token_nll(h, w, t, chunk, uniform=True), hidden, weight, targets, upstream
        )
        for uniform in (False, True):  # True + a per-token upstream: the promise broken, still exact (recomputed)
            got = _grads(lambda h, w, t, u=uniform: liger(h, w, t, uniform=u), hidden, weight, targets, upstream)
            assert (got[0][targets == IGNORE] == 0).all()
            for g, r, t in zip(got, ref, torch_kernel):
                assert close(g, r) and close(g, t)


def test_liger_weight_gradient_fires_once_dense_even_with_nothing_supervised():
    weight = torch.nn.Parameter(torch.randn(11, 4))
    fires = []
    weight.register_post_accumulate_grad_hook(lambda p: fires.append(1))
    hidden = torch.randn(2, 5, 4, requires_grad=True)
    for uniform in (False, True):
        weight.grad = None
        token_nll(hidden, weight, torch.full((2, 5), IGNORE), 2, uniform=uniform, kernel="liger").sum().backward()
        assert (weight.grad == 0).all() and (hidden.grad == 0).all()
    assert fires == [1, 1]


def test_liger_through_a_hugging_face_head_equals_the_torch_kernel():
    """install() with trainer.loss_kernel=liger on a real (tiny, tied) Qwen2: the head returns the same
    per-token losses as the torch kernel and every parameter's gradient equals its."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=131,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    models = {k: Qwen2ForCausalLM(cfg) for k in ("torch", "liger")}
    models["liger"].load_state_dict(models["torch"].state_dict())
    ids = torch.randint(0, 131, (2, 12))
    labels = ids.clone()
    labels[:, :6] = IGNORE
    out = {}
    for kernel, model in models.items():
        loss_head.install(model, 4, kernel)
        head = model.get_output_embeddings()
        assert head._loss_kernel == kernel
        head._loss_request = ("nll", F.pad(labels[:, 1:], (0, 1), value=IGNORE), True)
        nll = model(input_ids=ids, use_cache=False).logits
        head._loss_request = None
        (nll.sum() / (labels[:, 1:] != IGNORE).sum()).backward()
        out[kernel] = (nll.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert close(out["liger"][0], out["torch"][0])
    for name, grad in out["torch"][1].items():
        assert close(out["liger"][1][name], grad), name


def test_the_kernel_choice(monkeypatch):
    assert loss_head.kernel_for("torch") == "torch" and loss_head.kernel_for("liger") == "liger"  # interpreted here
    assert loss_head.kernel_for("auto") == ("liger" if torch.cuda.is_available() else "torch")  # auto: a GPU only
    chunked_loss.liger_problem.cache_clear()
    monkeypatch.delenv("TRITON_INTERPRET")
    try:
        if not torch.cuda.is_available():
            assert loss_head.kernel_for("auto") == "torch"
            with pytest.raises(
                ValueError,
                match=r"trainer.loss_kernel=liger: Liger's Triton kernels need a CUDA GPU.*"
                r"trainer.loss_kernel=torch",
            ):
                loss_head.kernel_for("liger")
        from liger_kernel.ops import fused_linear_cross_entropy as flce

        monkeypatch.setattr(
            flce, "fused_linear_cross_entropy_forward", lambda _input, weight, target, reduction="mean": None
        )
        chunked_loss.liger_problem.cache_clear()
        with pytest.raises(ValueError, match=r"liger-kernel \S+ is older than 0.8.5"):
            loss_head.kernel_for("liger")
        monkeypatch.setitem(__import__("sys").modules, "liger_kernel.ops", None)
        chunked_loss.liger_problem.cache_clear()
        with pytest.raises(ValueError, match=r"liger-kernel is not installed .*pip install 'fullft\[liger\]'"):
            loss_head.kernel_for("liger")
        assert loss_head.kernel_for("auto") == "torch"
    finally:
        monkeypatch.undo()
        chunked_loss.liger_problem.cache_clear()
