"""Freezing the first blocks of the model for a stage (`regularizer.freeze`).

The first transformer blocks hold the most general features; fine-tuning moves them least usefully
and forgets through them (Zheng et al., ICLR 2025, "spurious forgetting": with the bottom blocks of
Llama-3-8B frozen, general scores held while the task gain stayed). A frozen parameter keeps θ0 for
the whole stage, gets no gradient, and holds no optimizer state: under ZeRO-3 the fp32 master copy,
Adam's two moments and the gradient partition (16 bytes a parameter, partitioned over ranks) exist
only for the trainable ones.

What is frozen with `first_blocks=k`: blocks 0..k-1, and the token embeddings when the model's LM
head is untied (they sit below block 0). In a tied model the embedding is also the LM head, the top
of the model, so it stays trainable unless `embeddings=true`.

A checkpoint records what was frozen (trainer_state.json); a resume that freezes other parameters
stops with a message instead of DeepSpeed's KeyError (its optimizer state covers only the trained
ones). Resuming on another number of ranks works as for any run.
"""

from __future__ import annotations

import logging
from typing import Dict, List

from trainer.forgetting.interpolation import block_of

log = logging.getLogger("trainer")


def frozen_names(
    names: List[str], num_layers: int, first_blocks: int, embedding: str, freeze_embedding: bool
) -> List[str]:
    """The parameter names to freeze: every one in blocks 0..first_blocks-1, and `embedding` (the
    input embedding's name) when `freeze_embedding`."""
    if not 0 <= first_blocks < max(num_layers, 1):
        raise ValueError(
            f"regularizer.freeze.first_blocks={first_blocks}: the model has {num_layers} blocks; freeze "
            f"0 to {num_layers - 1} of them (all of them would leave only the top to train)"
        )
    out = []
    for name in names:
        block = block_of(name)
        if (block is not None and block < first_blocks) or (freeze_embedding and name == embedding):
            out.append(name)
    return out


def freeze(model, first_blocks: int, embeddings) -> Dict:
    """Set requires_grad=False on what `regularizer.freeze` names, before the optimizer is built (so it
    holds no state for them). Returns what was frozen, for the log and the run's summary."""
    named = dict(model.named_parameters())  # a tied head is the embedding's tensor: listed once
    emb = model.get_input_embeddings().weight
    out_emb = model.get_output_embeddings()
    tied = out_emb is not None and out_emb.weight is emb
    embedding = next(n for n, p in named.items() if p is emb)
    freeze_embedding = (not tied and first_blocks > 0) if embeddings is None else bool(embeddings)
    names = frozen_names(list(named), int(model.config.num_hidden_layers), first_blocks, embedding, freeze_embedding)
    for name in names:
        named[name].requires_grad_(False)

    def count(ps) -> int:
        return sum(int(getattr(p, "ds_numel", p.numel())) for p in ps)  # ZeRO-3: the full size, not the shard

    total, frozen = count(named.values()), count(named[n] for n in names)
    if names:
        what = [f"blocks 0-{first_blocks - 1}"] if first_blocks else []
        what += ["the token embeddings"] if freeze_embedding else []
        log.info(
            "regularizer.freeze: %s frozen%s: %s of %s parameters (%.1f%%) keep the stage's start and hold no "
            "optimizer state",
            " and ".join(what),
            " (the tied embeddings, also the LM head, stay trainable)" if tied and not freeze_embedding else "",
            f"{frozen:,}",
            f"{total:,}",
            100.0 * frozen / max(total, 1),
        )
    return {"frozen_parameters": frozen, "parameters": total, "tensors": names, "embeddings": freeze_embedding}
