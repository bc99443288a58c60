"""The LM head as the loss: every place that scores tokens (train_step, EWC's Fisher pass, evaluation,
the DPO reference pass) asks `score` for the per-token loss, never for the logits.

With trainer.loss_chunk_tokens on, `install` gives the model's LM head (an nn.Linear) a forward that,
while a request is armed, returns the per-token cross-entropy [batch, seq] computed in chunks
(trainer/objectives/chunked.py) instead of the logits [batch, seq, vocab]. The model is still called as
always (`engine(...)`), so DeepSpeed's engine forward, its output hooks and ZeRO-3's parameter hooks
run as they do for the logits: the head's weight is gathered for the head's forward by its pre-forward
hook and again for its backward by its pre-backward hook, and its gradient is reduced once. Unarmed
(generation, the isolation probe) the head is a plain linear layer.

Only for architectures whose forward is `logits = lm_head(hidden)` with nothing after it (Llama,
Qwen2/3, Mistral); others (Gemma2's soft-capping, Cohere's logit scale) keep the plain path.
"""

from __future__ import annotations

import contextlib
import logging
import types
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from data_pipeline.packing import IGNORE
from trainer.objectives.chunked import auto_chunk, liger_problem, token_nll
from trainer.objectives.distill import sparse_kl, sparse_kl_from_logits, topk_logprobs
from trainer.objectives.token import token_nll_from_logits

log = logging.getLogger("trainer")

PLAIN_HEAD_TYPES = ("llama", "qwen2", "qwen3", "mistral")
"""Model types whose logits are exactly lm_head(hidden states) in transformers 5.x."""


def chunking_for(hf_config, loss_chunk_tokens: Optional[int]) -> Optional[int]:
    """The chunk setting for this model: None = off, 0 = automatic size, N = N tokens a chunk.
    trainer.loss_chunk_tokens None (auto) turns it on where the logits outweigh the hidden states
    (vocab >= 4 x hidden: every real LM); 0 turns it off."""
    if loss_chunk_tokens == 0:
        return None
    if hf_config.model_type not in PLAIN_HEAD_TYPES or any(
        getattr(hf_config, k, None) for k in ("logit_scale", "final_logit_softcapping", "logits_scaling")
    ):
        if loss_chunk_tokens:
            log.warning(
                "trainer.loss_chunk_tokens=%d: model_type %r post-processes its logits; the loss stays "
                "on the full logits",
                loss_chunk_tokens,
                hf_config.model_type,
            )
        return None
    if loss_chunk_tokens is None:
        return 0 if hf_config.vocab_size >= 4 * hf_config.hidden_size else None
    return loss_chunk_tokens


def kernel_for(loss_kernel: str) -> str:
    """trainer.loss_kernel resolved: "liger" when asked for (an error naming the reason where it cannot
    run), or on auto where it can run on a CUDA GPU; else "torch"."""
    loss_kernel = str(loss_kernel)
    if loss_kernel == "torch":
        return "torch"
    problem = liger_problem()
    if loss_kernel == "liger":
        if problem:
            raise ValueError(f"trainer.loss_kernel=liger: {problem}; or set trainer.loss_kernel=torch (or auto)")
        return "liger"
    return "liger" if problem is None and torch.cuda.is_available() else "torch"


def install(model, chunk: Optional[int], loss_kernel: str = "torch") -> None:
    """Give `model`'s LM head the chunked-loss forward (chunk from chunking_for; None: leave it plain),
    its chunks computed by trainer.loss_kernel's kernel (kernel_for)."""
    if chunk is None:
        if str(loss_kernel) == "liger":
            log.warning("trainer.loss_kernel=liger does nothing here: the chunked cross-entropy is off for this model")
        return
    head = model.get_output_embeddings()
    if head.bias is not None:
        log.warning("the LM head has a bias: the loss stays on the full logits")
        return
    kernel = kernel_for(loss_kernel)
    head._loss_request = None
    head._loss_chunk = chunk
    head._loss_kernel = kernel
    head.forward = types.MethodType(_head_forward, head)
    log.info(
        "chunked cross-entropy: the LM head and the loss %s, %s (trainer.loss_chunk_tokens, trainer.loss_kernel)",
        f"in chunks of {chunk} tokens" if chunk else "in chunks of at most 256 MiB of fp32 logits",
        "on Liger's fused linear cross-entropy kernel" if kernel == "liger" else "in torch",
    )


def _head_forward(self, hidden: torch.Tensor) -> torch.Tensor:
    request = self._loss_request
    if request is None:
        return F.linear(hidden, self.weight)
    if request[0] == "topk":  # a teacher's top k: [batch, seq, 2k], the ids (exact in fp32) then the log-probs
        _, mask, k, targets = request
        where = mask.reshape(-1).nonzero().squeeze(1)
        picked = None if targets is None else targets.reshape(-1).index_select(0, where)
        ids, logp = topk_logprobs(
            hidden.reshape(-1, hidden.shape[-1]).index_select(0, where), self.weight, k, targets=picked
        )
        out = torch.zeros(mask.numel(), 2 * k, dtype=torch.float32, device=hidden.device)
        out[where] = torch.cat([ids.float(), logp], dim=1)
        return out.view(*mask.shape, 2 * k)
    if request[0] == "loglik":  # [batch, seq, 2]: log p(target) and whether the target is the argmax
        _, targets = request
        return target_logprobs(hidden, self.weight, targets, self._loss_chunk or None)
    if request[0] == "kl":
        _, ids, logq, mask = request
        return sparse_kl(hidden, self.weight, ids, logq, mask, self._loss_chunk or None, gather=_gathered)
    _, targets, uniform = request
    tokens = int((targets != IGNORE).sum())
    chunk = self._loss_chunk or auto_chunk(tokens, self.weight.shape[0])
    return token_nll(
        hidden, self.weight, targets, max(chunk, 1), gather=_gathered, uniform=uniform, kernel=self._loss_kernel
    )


def target_logprobs(
    hidden: torch.Tensor, weight: Optional[torch.Tensor], targets: torch.Tensor, chunk: Optional[int] = None
) -> torch.Tensor:
    """[*targets.shape, 2]: log softmax(hidden @ weight^T) at each target and 1.0 where the target is
    the argmax (greedy), both 0 where the target is IGNORE; fp32, one chunk of logits at a time.
    weight None: `hidden` are the logits already."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    where = (targets.reshape(-1) != IGNORE).nonzero().squeeze(1)
    out = torch.zeros(targets.numel(), 2, dtype=torch.float32, device=hidden.device)
    chunk = chunk or auto_chunk(len(where), flat.shape[-1] if weight is None else weight.shape[0])
    for s in range(0, len(where), chunk):
        at = where[s : s + chunk]
        z = flat.index_select(0, at)
        z = (z if weight is None else F.linear(z, weight)).float()
        tgt = targets.reshape(-1)[at].unsqueeze(1)
        logp = z.gather(1, tgt) - torch.logsumexp(z, dim=-1, keepdim=True)
        out[at] = torch.cat([logp, (z.argmax(-1, keepdim=True) == tgt).float()], dim=1)
    return out.view(*targets.shape, 2)


def _gathered(weight: torch.nn.Parameter):
    """The weight usable in backward: ZeRO-3's pre-backward hook has normally gathered it; if not,
    gather it here and partition it again afterwards (as DeepSpeed's own zero3 linear does)."""
    status = getattr(weight, "ds_status", None)
    if status is not None and status.name == "NOT_AVAILABLE":
        import deepspeed

        return deepspeed.zero.GatheredParameters([weight])
    return contextlib.nullcontext()


def score(engine, batch: Dict[str, torch.Tensor], device: torch.device, uniform: bool = False) -> torch.Tensor:
    """The per-token next-token loss [batch, seq - 1] of `batch` under the engine's model (0 where the
    label is IGNORE): through the chunked head when installed, else from the full logits. uniform:
    the caller's loss weights every token alike (a token mean), so the chunked head may compute its
    gradients in the forward pass (trainer/objectives/chunked.py)."""
    labels = batch["labels"]
    inputs = dict(
        input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device), use_cache=False
    )
    head = engine.module.get_output_embeddings()
    if not hasattr(head, "_loss_request"):
        return token_nll_from_logits(engine(**inputs).logits, labels)
    head._loss_request = ("nll", F.pad(labels[:, 1:], (0, 1), value=IGNORE).to(device), uniform)
    try:
        nll = engine(**inputs).logits
    finally:
        head._loss_request = None
    if nll.shape != labels.shape:
        raise RuntimeError(
            f"the chunked LM head returned {tuple(nll.shape)}, not per-token losses "
            f"{tuple(labels.shape)}: this architecture post-processes its logits; set "
            "trainer.loss_chunk_tokens=0"
        )
    return nll[:, :-1]


def _inputs(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict:
    return dict(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device), use_cache=False)


def _armed(engine, request, batch: Dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    head = engine.module.get_output_embeddings()
    head._loss_request = request
    try:
        return engine(**_inputs(batch, device)).logits
    finally:
        head._loss_request = None


@torch.no_grad()
def teacher_topk(engine, batch: Dict[str, torch.Tensor], device: torch.device, k: int, with_labels: bool = False):
    """The model's top-k next-token ids [batch, seq - 1, k] (int64) and log-probs (fp32) at every
    supervised position of `batch` (zeros elsewhere): what a distillation teacher stores
    (trainer/forgetting/distill.py). with_labels: the label is always among the k (it takes the k-th
    slot where it is not; trainer/forgetting/mft.py). Chunked through the head when installed."""
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    if not hasattr(engine.module.get_output_embeddings(), "_loss_request"):
        logits = engine(**_inputs(batch, device)).logits[:, :-1]
        flat = logits.reshape(-1, logits.shape[-1])
        targets = labels.reshape(-1).clamp_min(0).to(device) if with_labels else None
        ids, logp = topk_logprobs(flat, None, k, targets=targets)
        keep = mask.to(device)[..., None]
        ids, logp = ids.view(*labels.shape, k), logp.view(*labels.shape, k)
        return torch.where(keep, ids, 0), torch.where(keep, logp, 0.0)
    targets = F.pad(labels, (0, 1), value=IGNORE).to(device) if with_labels else None
    request = ("topk", F.pad(mask, (0, 1), value=False).to(device), k, targets)
    packed = _armed(engine, request, batch, device)[:, :-1]
    return packed[..., :k].round().long(), packed[..., k:].contiguous()


@torch.no_grad()
def continuation_logprobs(engine, batch: Dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """[batch, seq - 1, 2]: the log-probability of each supervised next token of `batch` and whether
    it is the model's greedy choice (0 elsewhere): what lm-eval's loglikelihood requests ask
    (trainer/harness.py). Chunked through the head when installed, else from the full logits."""
    targets = batch["labels"][:, 1:].to(device)
    if not hasattr(engine.module.get_output_embeddings(), "_loss_request"):
        logits = engine(**_inputs(batch, device)).logits[:, :-1]
        return target_logprobs(logits.reshape(-1, logits.shape[-1]), None, targets.reshape(-1)).view(*targets.shape, 2)
    padded = F.pad(targets, (0, 1), value=IGNORE)
    return _armed(engine, ("loglik", padded), batch, device)[:, :-1]


def distill_kl(engine, batch: Dict[str, torch.Tensor], device: torch.device, prefix: str = "teacher") -> torch.Tensor:
    """KL_k(teacher ‖ model) [batch, seq - 1] at every supervised position of `batch`, the teacher given
    by batch["teacher_ids"] / batch["teacher_logp"] [batch, seq - 1, k] (trainer/objectives/distill.py;
    prefix "target": a stage batch's corrective targets, trainer/forgetting/mft.py); 0 elsewhere.
    Chunked through the head when installed, never the full logits twice."""
    mask = (batch["labels"][:, 1:] != IGNORE).to(device)
    ids, logq = batch[f"{prefix}_ids"].to(device), batch[f"{prefix}_logp"].to(device).float()
    if not hasattr(engine.module.get_output_embeddings(), "_loss_request"):
        return sparse_kl_from_logits(engine(**_inputs(batch, device)).logits[:, :-1], ids, logq, mask)

    def pad(t: torch.Tensor, value) -> torch.Tensor:
        return torch.cat([t, torch.full_like(t[:, :1], value)], dim=1)

    return _armed(engine, ("kl", pad(ids, 0), pad(logq, 0.0), pad(mask, False)), batch, device)[:, :-1]
