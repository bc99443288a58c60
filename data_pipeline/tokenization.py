"""Tokenize normalised examples into (input_ids, labels), with labels masked to what the stage learns (its objective).

    pretrain   every token (documents end in EOS, which is learned too)
    sft        the final assistant turn (or the completion)
    instruct   every assistant turn

Assistant tokens are found by rendering the chat template on growing prefixes of the
conversation: the assistant turn i spans the characters between
render(messages[:i], add_generation_prompt=True) and render(messages[:i+1]). Tokens whose
characters lie inside a span are labels; everything else is -100. So whatever the template adds
after the content (EOS, an end-of-turn token) is learned, as the model must learn to stop.
"""

from __future__ import annotations

from typing import List, Tuple

from data_pipeline.choices import StageObjective, parse
from data_pipeline.formats import Example
from data_pipeline.packing import IGNORE
from data_pipeline.sources import DataError


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def check_chat_template(tokenizer, source: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{source}: the tokenizer has no chat template; set model.chat_template to a Jinja "
            "template (or use a tokenizer that ships one)"
        )


def encode(tokenizer, example: Example, objective: StageObjective) -> Tuple[List[int], List[int]]:
    """(input_ids, labels) for one example; labels are -100 where no loss is taken."""
    objective = parse(StageObjective, objective, "objective")  # a word it does not know is an error
    if example.messages is not None:
        return _encode_chat(
            tokenizer,
            example,
            last_only=(objective == StageObjective.sft),
            all_tokens=(objective == StageObjective.pretrain),
        )
    eos = tokenizer.eos_token_id
    prompt_ids = tokenizer(example.prompt, add_special_tokens=True)["input_ids"] if example.prompt else []
    text_ids = tokenizer(example.text, add_special_tokens=not prompt_ids)["input_ids"] + [eos]
    if objective == StageObjective.pretrain or not prompt_ids:
        return prompt_ids + text_ids, prompt_ids + text_ids
    return prompt_ids + text_ids, [IGNORE] * len(prompt_ids) + text_ids


def _encode_chat(tokenizer, example: Example, last_only: bool, all_tokens: bool) -> Tuple[List[int], List[int]]:
    messages = example.messages
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in turns[-1:] if last_only else turns:
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not full.startswith(upto) or not upto.startswith(before):
            raise DataError(
                f"{example.where}: the chat template does not render conversations prefix by prefix, "
                "so assistant turns cannot be located; use a template whose output for the first "
                "k messages is a prefix of the output for all of them"
            )
        spans.append((len(before), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if all_tokens:
        return ids, list(ids)
    labels = [
        tid if any(s <= a and b <= e and b > a for s, e in spans) else IGNORE
        for tid, (a, b) in zip(ids, enc["offset_mapping"])
    ]
    return ids, labels
