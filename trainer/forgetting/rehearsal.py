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

Two ways to make it:
- inside a stage, by the training engine itself (`regularizer.distill.prompts`): `own_answers` has every
  ZeRO-3 rank generate its share of the prompts at the stage's start, before the first step, and the
  answers become the stage's distillation data. Cached by the start's weights and the prompts, so a
  rerun or a resume reuses them; any model the trainer can train can answer, 70B included;
- before a stage, by `launch/rehearse.py`: one process on one device, `answers` below, for a JSONL to
  replay or distil on (or write the same JSONL with your inference server: one
  {"messages": [user, assistant]} record a line).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch

log = logging.getLogger("trainer")


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


@torch.no_grad()
def answers_on_engine(
    engine,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    rank: int,
    world_size: int,
    batch_size: int,
    system_prompt: Optional[str] = None,
) -> List[Answer]:
    """The engine's greedy answer to every prompt, in prompt order, on every rank. Collective: the
    prompts are sorted by length into left-padded batches of `batch_size`, the batches dealt to the
    ranks in turn, every rank runs the same number of `generate` calls (a rank with no batch left
    answers the first prompt again and drops it; `synced_gpus` keeps a finished rank stepping until all
    are done) and the answers are gathered."""
    from trainer import distributed
    from trainer.observability.generation import generate_left_padded

    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template: own answers are chat turns; use a chat model")
    ids = [_chat_ids(tokenizer, p, system_prompt) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    ends = {tokenizer.eos_token_id} | set(_as_list(getattr(engine.module.generation_config, "eos_token_id", None)))
    mine: Dict[int, Answer] = {}
    for first in range(0, len(batches), world_size):
        at = first + rank
        chunk = batches[at] if at < len(batches) else order[:1]
        rows = generate_left_padded(
            engine, [ids[i] for i in chunk], tokenizer, max_new_tokens, do_sample=False,
            eos_token_id=sorted(ends - {None}),
        )  # fmt: skip
        if at >= len(batches):
            continue
        for i, row in zip(chunk, rows):
            cut = next((n for n, t in enumerate(row) if t in ends), None)
            out = row if cut is None else row[: cut + 1]  # the end-of-turn token is part of the answer
            text = tokenizer.decode(out, skip_special_tokens=True).strip()
            mine[i] = Answer(prompts[i], ids[i], list(out), text, cut is not None)
    merged = {k: v for part in distributed.all_gather_object(mine) for k, v in part.items()}
    return [merged[i] for i in range(len(prompts))]


def _as_list(value) -> List[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def own_answers(
    engine,
    tokenizer,
    prompts_path: str,
    start_key: str,
    cache_dir: str,
    max_new_tokens: int,
    keep_cut_off: bool,
    batch_size: int,
    rank: int,
    world_size: int,
    local_rank: int,
    system_prompt: Optional[str] = None,
) -> Path:
    """The stage's start's answers to the prompts in `prompts_path` as a messages JSONL, generated now
    by the engine (`answers_on_engine`) unless already stored under `cache_dir`, keyed by the start's
    weights (`start_key`), the prompts and the generation settings. Answers cut off at max_new_tokens
    are dropped and counted unless `keep_cut_off`. Collective; every node's first process writes the
    file where it does not see it (a shared filesystem gets it once)."""
    from trainer import distributed

    prompts = read_prompts(Path(prompts_path))
    if not prompts:
        raise ValueError(f"regularizer.distill.prompts={prompts_path}: no prompts in it")
    settings = {"prompts": prompts, "max_new_tokens": max_new_tokens, "keep_cut_off": keep_cut_off,
                "system_prompt": system_prompt}  # fmt: skip
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(cache_dir) / "own_answers" / f"{start_key}-{digest}.jsonl"
    have = distributed.all_gather_object(out.is_file())
    if all(have):
        log.info("regularizer.distill: the start's own answers to %d prompts, stored -> %s", len(prompts), out)
        return out
    if any(have):  # some nodes have them (node-local caches): theirs, copied, never made again
        first = have.index(True)
        text = distributed.all_gather_object(out.read_text(encoding="utf-8") if rank == first else None)[first]
        _write_where_missing(out, text, rank, local_rank, world_size)
        log.info("regularizer.distill: the start's own answers, copied from rank %d's node -> %s", first, out)
        return out
    started = time.time()
    got = answers_on_engine(engine, tokenizer, prompts, max_new_tokens, rank, world_size, batch_size, system_prompt)
    kept = [a for a in got if a.text and (a.finished or keep_cut_off)]
    if not kept:
        raise RuntimeError(
            f"regularizer.distill.prompts={prompts_path}: none of the start's {len(got)} answers ended within "
            f"regularizer.distill.answer_tokens={max_new_tokens} tokens; raise it, or set "
            "regularizer.distill.keep_cut_off=true (the answers would then be distilled as cut off)"
        )
    text = "".join(json.dumps(record(a, system_prompt), ensure_ascii=False) + "\n" for a in kept)
    _write_where_missing(out, text, rank, local_rank, world_size)
    cut = sum(not a.finished for a in got)
    log.info(
        "regularizer.distill: the start's own answers to %d prompts generated in %.1f s: %d kept, %d cut off at "
        "%d tokens (%s), %d empty -> %s",
        len(got),
        time.time() - started,
        len(kept),
        cut,
        max_new_tokens,
        "kept" if keep_cut_off else "dropped",
        sum(not a.text for a in got),
        out,
    )
    return out


def _write_where_missing(out: Path, text: str, rank: int, local_rank: int, world_size: int) -> None:
    """`text` to `out` by rank 0, then by the first process of every node that does not see it (the
    same text everywhere). Collective."""
    from trainer import distributed

    for turn in (rank == 0, local_rank == 0):
        if turn and not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, out)
        if world_size > 1:
            distributed.barrier()
