"""Loaders and checks of the bundled lm-eval tasks (the YAML files beside this file). Data is read
from the .jsonl files here, wherever lm-eval runs from: nothing comes from a hub.

The instruction-following task (fullft_ifeval) is IFEval-style: every prompt carries format
constraints, and `process_results` checks the completion against each with code, never with a
model. prompt_level_acc: every constraint of a prompt held; inst_level_acc: constraints held, over
all constraints of all prompts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _load(name: str) -> datasets.DatasetDict:
    path = HERE / f"{name}.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if name == "fullft_ifeval":  # kwargs differ per check: one JSON string a row keeps the schema simple
        rows = [{**r, "kwargs": json.dumps(r["kwargs"])} for r in rows]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_general(**kwargs) -> datasets.DatasetDict:
    return _load("fullft_general")


def load_computing(**kwargs) -> datasets.DatasetDict:
    return _load("fullft_computing")


def load_medical(**kwargs) -> datasets.DatasetDict:
    return _load("fullft_medical")


def load_ifeval(**kwargs) -> datasets.DatasetDict:
    return _load("fullft_ifeval")


# ---- the instruction-following checks --------------------------------------------------------------


def _words(text: str) -> list:
    return re.findall(r"\b\w[\w'-]*\b", text)


def _json(text: str) -> bool:
    body = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.S | re.I)
    try:
        json.loads(fenced.group(1) if fenced else body)
    except ValueError:
        return False
    return True


def check(kind: str, response: str, **kw) -> bool:
    """Whether `response` meets one constraint (kind and its arguments, as in fullft_ifeval.jsonl)."""
    text = response.strip()
    if kind == "lowercase":  # as IFEval: some cased letters, none of them capitals
        return text.islower()
    if kind == "uppercase":
        return text.isupper()
    if kind == "length_words":
        n = len(_words(text))
        return n < kw["num"] if kw["relation"] == "less than" else n >= kw["num"]
    if kind == "keywords":
        return all(re.search(rf"\b{re.escape(w)}\b", text, flags=re.I) for w in kw["words"])
    if kind == "forbidden_words":
        return bool(text) and not any(re.search(rf"\b{re.escape(w)}\b", text, flags=re.I) for w in kw["words"])
    if kind == "bullets":  # markdown bullets: "* " or "- " at a line's start
        return len(re.findall(r"^\s*[*-] ", text, flags=re.M)) == kw["num"]
    if kind == "json":
        return _json(text)
    if kind == "no_comma":
        return bool(text) and "," not in text
    if kind == "ends_with":  # as IFEval: case-insensitive
        return text.lower().endswith(kw["phrase"].lower())
    raise ValueError(
        f"fullft_ifeval: unknown check {kind!r}; known: lowercase, uppercase, length_words, "
        "keywords, forbidden_words, bullets, json, no_comma, ends_with"
    )


def process_ifeval(doc: dict, results: list) -> dict:
    """lm-eval's process_results: the completion against every constraint of the prompt."""
    response = results[0]
    held = [check(kind, response, **kw) for kind, kw in zip(doc["checks"], json.loads(doc["kwargs"]))]
    return {"prompt_level_acc": all(held), "inst_level_acc": held}


def inst_level_acc(items: list) -> float:
    """lm-eval's aggregation of inst_level_acc: the constraints held over all constraints."""
    flat = [held for per_prompt in items for held in per_prompt]
    return sum(flat) / len(flat)
