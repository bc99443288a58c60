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
        model = engine.module
        tok = self.tokenizer
        ids = [self.render(p) for p in self.prompts]
        width = max(len(i) for i in ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # Left padding: every prompt ends at the same column, where generation starts.
        input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=engine.device)
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=engine.device)
        was_training, cache = model.training, model.config.use_cache
        model.eval()
        try:
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                use_cache=True,
                synced_gpus=True,
                pad_token_id=pad,
                eos_token_id=tok.eos_token_id,
            )
        finally:
            model.config.use_cache = cache  # generation only: training stays cache-free
            if was_training:
                model.train()
        new = out[:, width:].tolist()
        return [
            {"prompt": p, "completion": tok.decode(_until_eos(n, tok.eos_token_id), skip_special_tokens=True)}
            for p, n in zip(self.prompts, new)
        ]


def _until_eos(ids: List[int], eos: Optional[int]) -> List[int]:
    """A generated row up to its first EOS (after it: padding, for a batch whose other rows ran longer)."""
    return ids[: ids.index(eos)] if eos in ids else ids
