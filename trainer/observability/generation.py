"""Generations for a fixed prompt set at each eval, so people can read what the model says as it
trains (logged by the tracker to output_dir/samples.jsonl and a W&B table).

Under ZeRO-3 every forward is collective (each layer's parameters are gathered from all ranks), so
every rank generates, for the same prompts, and `synced_gpus=True` keeps a rank that has finished
stepping until every rank has: the ranks run the same number of forwards. Greedy decoding, a few
prompts and few new tokens keep it cheap. The KV cache is on for generation only: training keeps
`use_cache=False` (a cache breaks packed-document isolation, see trainer/engine/model.py).
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional

import torch

log = logging.getLogger("trainer")


class Generator:
    def __init__(
        self, prompts: List[str], max_new_tokens: int, tokenizer, chat: bool, system_prompt: Optional[str] = None
    ) -> None:
        self.prompts, self.max_new_tokens, self.tokenizer = list(prompts), max_new_tokens, tokenizer
        self.chat = chat and bool(getattr(tokenizer, "chat_template", None))
        self.system_prompt = system_prompt

    def render(self, prompt: str) -> List[int]:
        """Token ids of a prompt as training saw such text: through the chat template (as the user
        turn, with the generation prompt) for sft/instruct, plain text for pretraining."""
        if not self.chat:
            return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        text = self.tokenizer.apply_chat_template(
            messages + [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def generate(self, engine) -> List[Dict[str, str]]:
        """[{prompt, completion}] for every prompt; every rank must call this at the same point."""
        if not self.prompts:
            return []
        tok = self.tokenizer
        new = generate_left_padded(
            engine, [self.render(p) for p in self.prompts], tok, self.max_new_tokens,
            do_sample=False, eos_token_id=tok.eos_token_id,
        )  # fmt: skip
        return [
            {"prompt": p, "completion": tok.decode(_until_eos(n, tok.eos_token_id), skip_special_tokens=True)}
            for p, n in zip(self.prompts, new)
        ]


@torch.no_grad()
def generate_left_padded(engine, prompts: List[List[int]], tok, max_new_tokens: int, **kwargs) -> List[List[int]]:
    """The new token ids of each prompt, generated as one left-padded batch (every prompt ends where
    generation starts) with the KV cache on for this call only and the model in eval mode, back in its
    mode after. Collective under ZeRO-3: `synced_gpus` keeps a finished rank stepping until all are
    done. kwargs go to `model.generate` (the Generator here, lm-eval's requests in trainer/harness.py)."""
    model = engine.module
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=engine.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=engine.device)
    was_training, cache = model.training, model.config.use_cache
    model.eval()
    try:
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            use_cache=True,
            synced_gpus=True,
            pad_token_id=pad,
            **kwargs,
        )
    finally:
        model.config.use_cache = cache  # generation only: training stays cache-free
        if was_training:
            model.train()
    return out[:, width:].tolist()


def _until_eos(ids: List[int], eos: Optional[int]) -> List[int]:
    """A generated row up to its first EOS (after it: padding, for a batch whose other rows ran longer)."""
    return ids[: ids.index(eos)] if eos in ids else ids
