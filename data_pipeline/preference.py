"""Preference pairs for a DPO stage: read -> normalise -> tokenize -> pack, never splitting a pair.

Three record shapes, one per line of a .jsonl (or a row of any other source data_pipeline reads):

    text            {"prompt": "...", "chosen": "...", "rejected": "..."}          (plain text; EOS added)
    conversational  {"prompt": [messages], "chosen": [assistant turn(s)], "rejected": [...]}
    full dialogues  {"chosen": [messages], "rejected": [messages]}    (HH-RLHF style: the prompt is the
                    longest common prefix of the two conversations, which must end before an assistant turn)

Tokenization follows TRL's DPOTrainer, so a pair gives the same tokens here and there: the prompt is
tokenized alone (with the generation prompt of the chat template), prompt+chosen and prompt+rejected
are tokenized whole, and each completion starts where its tokens leave the prompt's.

A pair is packed as two documents side by side, prompt+chosen then prompt+rejected, each with its own
positions (so neither attends to the other), and `document` numbers them in their row:

    row:        [p p c c c | p p r r | p' c' c' | p' r' | pad]
    document:   [0 0 0 0 0   1 1 1 1   2  2  2    3  3    -1 ]     pair k = documents 2k (chosen), 2k+1
    supervised: [- - c c c   - - r r   -  c' c'   -  r'   -  ]

A pair longer than the row follows data.overlong: truncate (both completions cut to the longest common
length that fits, the prompt kept whole), drop, or auto (= truncate); split is refused for pairs.
Every case is counted in the manifest; nothing is lost silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from data_pipeline.sources import DataError, Record

Messages = List[Dict[str, str]]
_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Pair:
    """One normalised preference pair: plain text (str fields) or a conversation (message lists)."""

    where: str
    prompt: Union[str, Messages]
    chosen: Union[str, Messages]
    rejected: Union[str, Messages]

    @property
    def conversational(self) -> bool:
        return not isinstance(self.prompt, str)


def is_preference_record(data: Dict[str, Any]) -> bool:
    return "chosen" in data and "rejected" in data


def _messages(value: Any, where: str, key: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{key}' must be a non-empty list of messages or a string")
    out = []
    for i, turn in enumerate(value):
        role = turn.get("role") if isinstance(turn, dict) else None
        content = turn.get("content") if isinstance(turn, dict) else None
        if role not in _ROLES or not isinstance(content, str):
            raise DataError(
                f"{where}: {key}[{i}] must have 'role' (system/user/assistant) and a string 'content', "
                f"got {turn!r:.120}"
            )
        out.append({"role": role, "content": content})
    return out


def _completion(value: Any, where: str, key: str) -> Messages:
    """A conversational completion: a string becomes one assistant turn; a list must start with one."""
    turns = [{"role": "assistant", "content": value}] if isinstance(value, str) else _messages(value, where, key)
    if turns[0]["role"] != "assistant":
        raise DataError(f"{where}: field '{key}' must start with an assistant turn, got role {turns[0]['role']!r}")
    if not any(t["role"] == "assistant" and t["content"].strip() for t in turns):
        raise DataError(f"{where}: field '{key}' has no non-empty assistant turn")
    return turns


def normalise_pair(record: Record) -> Pair:
    """The record as a Pair, or a DataError naming file:line, the field and what was expected."""
    data, where = record.data, record.where
    if "__error__" in data:
        raise DataError(f"{where}: {data['__error__']}")
    if not is_preference_record(data):
        raise DataError(
            f"{where}: a preference pair needs 'chosen' and 'rejected' (and 'prompt', unless both are "
            f"whole conversations sharing it); got keys {sorted(data)}"
        )
    chosen, rejected = data["chosen"], data["rejected"]
    if "prompt" not in data or data["prompt"] is None:
        if isinstance(chosen, str) or isinstance(rejected, str):
            raise DataError(
                f"{where}: field 'prompt' is missing; text pairs need {{prompt, chosen, rejected}} "
                "(only whole conversations in chosen/rejected may leave the prompt out)"
            )
        pair = _split_shared_prompt(_messages(chosen, where, "chosen"), _messages(rejected, where, "rejected"), where)
    elif isinstance(data["prompt"], str):
        prompt = data["prompt"]
        if not prompt.strip():
            raise DataError(f"{where}: field 'prompt' is empty")
        if isinstance(chosen, str) and isinstance(rejected, str):
            for key, text in (("chosen", chosen), ("rejected", rejected)):
                if not text.strip():
                    raise DataError(f"{where}: field '{key}' is empty")
            pair = Pair(where, prompt, chosen, rejected)
        else:  # a text prompt with conversational completions: the prompt is one user turn
            pair = Pair(
                where,
                [{"role": "user", "content": prompt}],
                _completion(chosen, where, "chosen"),
                _completion(rejected, where, "rejected"),
            )
    else:
        prompt = _messages(data["prompt"], where, "prompt")
        if prompt[-1]["role"] == "assistant":
            raise DataError(f"{where}: field 'prompt' ends with an assistant turn; the completions are the next turn")
        pair = Pair(where, prompt, _completion(chosen, where, "chosen"), _completion(rejected, where, "rejected"))
    if pair.chosen == pair.rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical; a pair must differ to teach a preference")
    return pair


def _split_shared_prompt(chosen: Messages, rejected: Messages, where: str) -> Pair:
    """HH-RLHF style: the prompt is the longest common prefix of the two conversations, cut back to
    end before an assistant turn of both."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == len(chosen) == len(rejected):
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical; a pair must differ to teach a preference")
    while n > 0 and not (
        chosen[n:] and chosen[n]["role"] == "assistant" and rejected[n:] and rejected[n]["role"] == "assistant"
    ):
        n -= 1
    if n == 0:
        raise DataError(
            f"{where}: the prompt is missing: 'chosen' and 'rejected' share no turns before the "
            "assistant turn where they differ (give 'prompt' explicitly, or whole conversations that "
            "start with the same user turn)"
        )
    return Pair(
        where, chosen[:n], _completion(chosen[n:], where, "chosen"), _completion(rejected[n:], where, "rejected")
    )


# ---- tokens -------------------------------------------------------------------------------------


def _common_prefix(a: List[int], b: List[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_pair(tokenizer, pair: Pair, system_prompt: Optional[str] = None) -> Tuple[List[int], List[int], List[int]]:
    """(prompt_ids, chosen_ids, rejected_ids) as TRL's DPOTrainer tokenizes them: the completion
    tokens are what prompt+completion adds to the tokens it shares with the prompt alone."""
    if pair.conversational:
        prompt = list(pair.prompt)
        if system_prompt and prompt[0]["role"] != "system":
            prompt.insert(0, {"role": "system", "content": system_prompt})

        def ids(messages, generation_prompt=False):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        prompt_ids, with_chosen, with_rejected = (
            ids(prompt, True),
            ids(prompt + pair.chosen),
            ids(prompt + pair.rejected),
        )
    else:
        eos = tokenizer.eos_token
        end = lambda text: text if text.endswith(eos) else text + eos  # noqa: E731  (TRL adds EOS the same way)
        prompt_ids = tokenizer(pair.prompt)["input_ids"]
        with_chosen = tokenizer(pair.prompt + end(pair.chosen))["input_ids"]
        with_rejected = tokenizer(pair.prompt + end(pair.rejected))["input_ids"]
    n = min(_common_prefix(prompt_ids, with_chosen), _common_prefix(prompt_ids, with_rejected))
    if n == 0:  # nothing to condition on: a completion's first token could not be scored
        raise DataError(
            f"{pair.where}: the prompt's tokens merge into the completion's (no token of the prompt "
            "survives in prompt+completion); end the prompt on a word boundary, e.g. with a space or newline"
        )
    chosen_ids, rejected_ids = with_chosen[n:], with_rejected[n:]
    if not chosen_ids or not rejected_ids:
        raise DataError(f"{pair.where}: a completion tokenizes to nothing after the prompt")
    if chosen_ids == rejected_ids:
        raise DataError(f"{pair.where}: 'chosen' and 'rejected' tokenize identically; a pair must differ")
    return prompt_ids[:n], chosen_ids, rejected_ids


def fit_pair(prompt: int, chosen: int, rejected: int, seq_len: int) -> Optional[int]:
    """The longest completion length k such that the pair, both completions cut to at most k tokens,
    fits a row of seq_len: 2*prompt + min(chosen, k) + min(rejected, k) <= seq_len. None when not
    even one token of each fits.

    prompt 10, chosen 30, rejected 8, seq_len 40: 20 + 8 + k <= 40 gives k = 12 (chosen cut to 12).
    """
    room = seq_len - 2 * prompt
    if room < 2:
        return None
    short, long_ = sorted((chosen, rejected))
    if short * 2 <= room:
        return min(long_, room - short)
    return room // 2


def write_pairs(
    work, pairs: List[Tuple[List[int], List[int], List[int]]], seq_len: int, packing: bool, pad_id: int
) -> Tuple[int, int]:
    """Rows of whole pairs into `work` (input_ids, supervised, position_ids, filled, document .npy);
    best-fit-decreasing over pair lengths, or one pair a row without packing. Returns (rows, the most
    documents a row holds)."""
    from numpy.lib.format import open_memmap

    from data_pipeline.packing import best_fit_decreasing

    lengths = [2 * len(p) + len(c) + len(r) for p, c, r in pairs]
    bins = best_fit_decreasing(lengths, seq_len) if packing else [[i] for i in range(len(pairs))]
    pos_dtype = np.uint16 if seq_len <= np.iinfo(np.uint16).max else np.int32
    ids_out = open_memmap(work / "input_ids.npy", mode="w+", dtype=np.uint32, shape=(len(bins), seq_len))
    sup_out = open_memmap(work / "supervised.npy", mode="w+", dtype=np.bool_, shape=(len(bins), seq_len))
    pos_out = open_memmap(work / "position_ids.npy", mode="w+", dtype=pos_dtype, shape=(len(bins), seq_len))
    doc_out = open_memmap(work / "document.npy", mode="w+", dtype=np.int16, shape=(len(bins), seq_len))
    filled = np.zeros(len(bins), dtype=np.int64)
    ids_out[:] = pad_id
    doc_out[:] = -1
    most = 0
    for r, members in enumerate(bins):
        at, doc = 0, 0
        for i in members:
            prompt, chosen, rejected = pairs[i]
            for completion in (chosen, rejected):
                n = len(prompt) + len(completion)
                ids_out[r, at : at + n] = prompt + completion
                sup_out[r, at + len(prompt) : at + n] = True
                sup_out[r, at] = False  # a document's first token is never predicted (see packing.py)
                pos_out[r, at : at + n] = np.arange(n)
                doc_out[r, at : at + n] = doc
                at, doc = at + n, doc + 1
        pos_out[r, at:] = np.arange(seq_len - at)  # padding is a document of its own (see packing.py)
        filled[r] = at
        most = max(most, doc)
    for arr in (ids_out, sup_out, pos_out, doc_out):
        arr.flush()
    np.save(work / "filled.npy", filled)
    return len(bins), most


def is_preference_source(path: str, split: str = "train") -> bool:
    """The source's first record is a preference pair (has chosen and rejected): how a dpo stage tells
    its pair eval sets from the token-loss ones (general text, held-out answers)."""
    from data_pipeline.sources import read_records

    for record in read_records(path, split):
        return is_preference_record(record.data)
    return False
