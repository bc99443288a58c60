"""How far a fine-tuned model has moved from its base, scored on exported weights (the real-model
profile of bench/forgetting.py). Four numbers per model, all on held-out data and all "lower is
closer to the base" except the domain loss:

  general   mean token loss on held-out general text (a corpus nobody here wrote)
  domain    mean token loss on held-out domain text (what the fine-tune should improve)
  chat      mean token loss of the base model's own greedy answers to general chat prompts,
            generated once before any tuning: the base scores low on them, and they rise as the
            tuned model stops answering the way the base did (chat behaviour, not facts). A model
            made sharper, or more like its own greedy self, lowers it without keeping what the base
            could do, so it is reported beside:
  chat_sampled  the same on the base's answers *sampled* at temperature 1 from its whole
            distribution (one per prompt, seeded): the tuned model's loss minus the base's is a
            Monte Carlo estimate of KL(base || tuned) on chat, per answer token, without bias
  kl        mean KL(base || tuned) of the next-token distribution over the general text, label-free;
            the base's side is computed once and kept as its top-k probabilities plus the mass of
            the rest (one "other" bucket), which makes this a lower bound of the full-vocabulary KL
            (grouping outcomes never increases KL); top-k 64 holds nearly all of the base's mass

The probe (token ids, the base's answers and top-k) is built once per base model and data and cached
as probe.pt; scoring runs plain Hugging Face forwards in fp32, a batch of rows at a time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

IGNORE = -100

# General chat prompts written for this probe (only the prompts: the answers are the base model's).
CHAT_PROMPTS = [
    "What causes the seasons on Earth?",
    "Give me three tips for sleeping better.",
    "Explain what a noun is, with an example.",
    "Why is the sky blue?",
    "Write a short poem about autumn.",
    "How do I boil an egg?",
    "What is the capital of France, and what is it famous for?",
    "Summarise the story of Romeo and Juliet in two sentences.",
    "What is the difference between weather and climate?",
    "Suggest a name for a friendly golden retriever.",
    "How many days are there in a leap year, and why?",
    "What should I pack for a weekend hiking trip?",
    "Translate 'good morning' into Spanish and French.",
    "Why do we have to drink water every day?",
    "Tell me a fun fact about octopuses.",
    "How can I be more productive when working from home?",
    "What is photosynthesis?",
    "Write a polite email declining a meeting invitation.",
    "What are the primary colours?",
    "Who wrote Pride and Prejudice, and what is it about?",
    "How does a rainbow form?",
    "Give me a simple recipe for pancakes.",
    "What is the tallest mountain in the world?",
    "Explain the rules of tic-tac-toe.",
]


@dataclass
class Probe:
    general: List[List[int]]
    domain: List[List[int]]
    chat: List[Tuple[List[int], List[int]]]  # (input ids, labels: the answer's tokens, IGNORE elsewhere)
    answers: List[Dict[str, str]]
    chat_sampled: List[Tuple[List[int], List[int]]]  # the same for the base's sampled answers (T = 1)
    topk_index: torch.Tensor  # [positions of `general`, k] the base's k likeliest next tokens
    topk_logp: torch.Tensor  # [positions, k] their log-probabilities under the base

    def tokens(self) -> Dict[str, int]:
        return {
            "general": sum(len(d) - 1 for d in self.general),
            "domain": sum(len(d) - 1 for d in self.domain),
            "chat": sum(sum(1 for x in lab[1:] if x != IGNORE) for _, lab in self.chat),
            "chat_sampled": sum(sum(1 for x in lab[1:] if x != IGNORE) for _, lab in self.chat_sampled),
        }


def _take(texts: Sequence[str], tokenizer, budget: int, max_doc_tokens: int) -> List[List[int]]:
    """Documents in order, each cut to max_doc_tokens, until `budget` tokens are taken."""
    out, total = [], 0
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"][:max_doc_tokens]
        if len(ids) < 2:
            continue
        out.append(ids)
        total += len(ids)
        if total >= budget:
            break
    return sorted(out, key=len)  # scored in this order: batches of similar lengths pad little


def _rows(batch: Sequence[Tuple[List[int], List[int]]], pad: int):
    width = max(len(i) for i, _ in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, (i, lab) in enumerate(batch):
        ids[r, : len(i)] = torch.tensor(i)
        labels[r, : len(lab)] = torch.tensor(lab)
        mask[r, : len(i)] = 1
    return ids, labels, mask


def _batches(samples, batch_size: int):
    for s in range(0, len(samples), batch_size):
        yield samples[s : s + batch_size]


@torch.no_grad()
def _forward(model, samples: List[Tuple[List[int], List[int]]], pad: int, batch_size: int):
    """Yields (log-probs of the next token [n, vocab], targets [n]) at every labelled position, batch by
    batch, in sample order (callers keep samples sorted by length: less padding)."""
    for batch in _batches(samples, batch_size):
        ids, labels, mask = _rows(batch, pad)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        target = labels[:, 1:]
        keep = target != IGNORE
        yield torch.log_softmax(logits[keep], dim=-1), target[keep]


def _text_samples(docs: List[List[int]]) -> List[Tuple[List[int], List[int]]]:
    return [(d, d) for d in docs]


def key(model_dir: Path, general: Path, domain: Path, settings: Dict) -> str:
    """The probe's identity: the model's files by path, size and time (hashing them would take seconds),
    the held-out texts by content (so a probe is found again under another output directory)."""
    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")) + [model_dir / "config.json"]:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    for f in (general, domain):
        h.update(hashlib.sha256(f.read_bytes()).digest())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:12]


def load_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa").eval()


@torch.no_grad()
def build_probe(
    model_dir: Path,
    general: Sequence[str],
    domain: Sequence[str],
    cache: Path,
    *,
    text_tokens: int = 4096,
    max_doc_tokens: int = 256,
    answer_tokens: int = 64,
    top_k: int = 64,
    batch_size: int = 8,
    prompts: Sequence[str] = CHAT_PROMPTS,
    sample_seed: int = 0,
) -> Probe:
    """The probe of `model_dir` (the base): general/domain documents (about text_tokens each), the
    base's greedy answers to `prompts` (at most answer_tokens, ending at its end-of-turn token when
    it stops by itself), one answer to each sampled at temperature 1 (seeded by sample_seed), and its
    top-k next-token log-probs on the general documents. Cached at `cache`."""
    if cache.is_file():
        return Probe(**torch.load(cache, weights_only=True))
    from transformers import AutoTokenizer

    from trainer.forgetting import rehearsal

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = load_model(model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    g = _take(general, tok, text_tokens, max_doc_tokens)
    d = _take(domain, tok, text_tokens, max_doc_tokens)

    chat, answers = [], []
    for a in rehearsal.answers(model, tok, prompts, answer_tokens):  # greedy, one at a time: no padding
        chat.append((a.prompt_ids + a.answer_ids, [IGNORE] * len(a.prompt_ids) + a.answer_ids))
        answers.append({"prompt": a.prompt, "answer": a.text})
    order = sorted(range(len(chat)), key=lambda i: len(chat[i][0]))
    chat, answers = [chat[i] for i in order], [answers[i] for i in order]
    sampled = [
        (a.prompt_ids + a.answer_ids, [IGNORE] * len(a.prompt_ids) + a.answer_ids)
        for a in rehearsal.answers(model, tok, prompts, answer_tokens, temperature=1.0, seed=sample_seed)
    ]
    sampled.sort(key=lambda s: len(s[0]))

    index, logp = [], []
    for lp, _ in _forward(model, _text_samples(g), pad, batch_size):
        top = lp.topk(top_k, dim=-1)
        index.append(top.indices.to(torch.int32))
        logp.append(top.values)
    probe = Probe(
        general=g,
        domain=d,
        chat=chat,
        answers=answers,
        chat_sampled=sampled,
        topk_index=torch.cat(index),
        topk_logp=torch.cat(logp),
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save(probe.__dict__, tmp)
    tmp.replace(cache)
    return probe


def kl_topk(base_index: torch.Tensor, base_logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position with p known only on its top-k (`base_index`, `base_logp`) and the rest
    of both distributions merged into one bucket: sum_i p_i (log p_i - log q_i) + p_rest (log p_rest -
    log q_rest). `logq`: [n, vocab] log-probs of the tuned model. A lower bound of the full KL: the
    trainer's own KL_k (trainer/objectives/distill.py, what regularizer.distill minimises)."""
    from trainer.objectives.distill import topk_kl

    return topk_kl(logq, base_index, base_logp)


@torch.no_grad()
def score(model, probe: Probe, pad: int, batch_size: int = 8) -> Dict[str, float]:
    """general / domain / chat / chat_sampled mean token loss and the mean top-k KL from the base on the
    general text."""
    out: Dict[str, float] = {}
    pos, kl_sum, nll_sum, n = 0, 0.0, 0.0, 0
    for lp, target in _forward(model, _text_samples(probe.general), pad, batch_size):
        m = target.numel()
        nll_sum += float(-lp.gather(1, target[:, None]).sum())
        kl_sum += float(kl_topk(probe.topk_index[pos : pos + m], probe.topk_logp[pos : pos + m], lp).double().sum())
        pos, n = pos + m, n + m
    if pos != probe.topk_index.shape[0]:
        raise RuntimeError(
            f"probe: {pos} general positions scored but the base's top-k has {probe.topk_index.shape[0]}"
        )
    out["general"], out["kl"] = nll_sum / n, kl_sum / n
    for name, samples in (
        ("domain", _text_samples(probe.domain)),
        ("chat", probe.chat),
        ("chat_sampled", probe.chat_sampled),
    ):
        total, count = 0.0, 0
        for lp, target in _forward(model, samples, pad, batch_size):
            total += float(-lp.gather(1, target[:, None]).sum())
            count += target.numel()
        out[name] = total / count
    return out
