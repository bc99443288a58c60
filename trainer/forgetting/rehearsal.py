"""Rehearsal data: the model's own answers to general prompts, written before it is fine-tuned, to
replay while it is (regularizer.replay.path, with regularizer.replay.objective=instruct in a
continued-pretraining stage).

Why: what a chat model must not forget is how it answers, and raw general text does not carry that
(bench/forgetting.py's real profile: replaying raw text made the chat drift worse). Its own answers
do, and need no data nobody has: any set of general prompts will do (Huang et al., "Mitigating
Catastrophic Forgetting in Large Language Models with Self-Synthesized Rehearsal", ACL 2024). The
answers are generated one prompt at a time, greedy by default (no padding inside a generation, so an
answer is the model's alone), and an answer cut off by max_new_tokens is dropped and counted: training
on it would teach the model to end its turn mid-sentence.

This runs one process on one device (fine for models that fit one; for larger ones, write the same
JSONL with your inference server: one {"messages": [user, assistant]} record a line).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import torch


@dataclass
class Answer:
    prompt: str
    prompt_ids: List[int]
    answer_ids: List[int]
    """The generated tokens, the end-of-turn token included when the model stopped by itself."""
    text: str
    finished: bool
    """False when max_new_tokens cut the answer off."""


def read_prompts(path: Path) -> List[str]:
    """Prompts from a .txt file (one a line; blank lines skipped) or a .jsonl file (a record a line with
    "prompt", or "instruction" plus an optional "input", or "messages" whose first user turn is used)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompts file (a .txt with a prompt a line, or a .jsonl)")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        return [line.strip() for line in lines if line.strip()]
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg}); a .jsonl prompts file holds one record a line") from None
        prompt = _prompt_of(rec) if isinstance(rec, dict) else None
        if not prompt:
            raise ValueError(
                f"{path}:{n}: no prompt in this record (keys {sorted(rec) if isinstance(rec, dict) else rec!r}); "
                'expected "prompt", "instruction" (+ "input") or "messages" with a user turn'
            )
        prompts.append(prompt)
    return prompts


def _prompt_of(rec: dict) -> Optional[str]:
    if isinstance(rec.get("prompt"), str):
        return rec["prompt"]
    if isinstance(rec.get("instruction"), str):
        extra = rec.get("input")
        return rec["instruction"] + (f"\n\n{extra}" if isinstance(extra, str) and extra.strip() else "")
    for m in rec.get("messages") or []:
        if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
            return m["content"]
    return None


def _chat_ids(tokenizer, prompt: str, system_prompt: Optional[str]) -> List[int]:
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    system_prompt: Optional[str] = None,
    temperature: float = 0.0,
    seed: int = 0,
) -> Iterator[Answer]:
    """The model's answer to each prompt, rendered through the tokenizer's chat template as training
    renders a user turn (greedy with temperature 0, else sampled from the whole distribution at that
    temperature; seeded)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat template: rehearsal answers are chat turns; use a chat model "
            "(or set one on the tokenizer)"
        )
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    try:
        for prompt in prompts:
            ids = _chat_ids(tokenizer, prompt, system_prompt)
            # sampled: from the model's own distribution at `temperature`, not cut to a top-k or top-p
            # (a generation_config may set either; the sampled answers then estimate KL without bias)
            sample = (
                dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
                if temperature > 0
                else dict(do_sample=False)
            )
            out = model.generate(
                input_ids=torch.tensor([ids], device=device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=eos,
                **sample,
            )[0, len(ids) :].tolist()
            finished = eos in out
            if finished:
                out = out[: out.index(eos) + 1]  # the end-of-turn token is part of the answer
            yield Answer(prompt, ids, out, tokenizer.decode(out, skip_special_tokens=True).strip(), finished)
    finally:
        if was_training:
            model.train()


def record(answer: Answer, system_prompt: Optional[str] = None) -> dict:
    """The training record of an answer (the data pipeline's `messages` format)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return {
        "messages": messages
        + [{"role": "user", "content": answer.prompt}, {"role": "assistant", "content": answer.text}]
    }
