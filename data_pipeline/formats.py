"""Normalise every record format to one of two shapes: a conversation (list of role/content
messages) or raw text.

    alpaca      {"instruction", "input"?, "output", "system"?}
    sharegpt    {"conversations": [{"from": human|gpt|system, "value"}]}
    messages    {"messages": [{"role": system|user|assistant, "content"}]}
    completion  {"prompt", "completion"}          (plain text, loss on the completion)
    text        {"text"}                          (.txt documents become this)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from data_pipeline.choices import DataFormat
from data_pipeline.sources import DataError, Record

FORMATS = tuple(f.value for f in DataFormat if f != DataFormat.auto)
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "model": "assistant",
}


@dataclass(frozen=True)
class Example:
    """One normalised sample: either `messages` or `prompt` + `text` (prompt may be empty)."""

    where: str
    messages: Optional[List[Dict[str, str]]] = None
    prompt: str = ""
    text: str = ""


def detect_format(data: Dict[str, Any]) -> Optional[str]:
    if "messages" in data:
        return "messages"
    if "conversations" in data:
        return "sharegpt"
    if "instruction" in data and "output" in data:
        return "alpaca"
    if "prompt" in data and "completion" in data:
        return "completion"
    if "text" in data:
        return "text"
    return None


def _str_field(data: Dict[str, Any], key: str, where: str, fmt: str, required: bool = True) -> str:
    value = data.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        got = "missing" if value is None else f"a {type(value).__name__}"
        raise DataError(f"{where}: field '{key}' is {got}; the {fmt} format expects a string")
    return value


def normalise(record: Record, fmt: str) -> Example:
    """The record as an Example, or a DataError naming file:line, the field and what was expected."""
    data, where = record.data, record.where
    if "__error__" in data:
        raise DataError(f"{where}: {data['__error__']}")
    if fmt == "auto":
        detected = detect_format(data)
        if detected is None:
            raise DataError(
                f"{where}: cannot tell the format from keys {sorted(data)}; expected one of "
                "messages / conversations / instruction+output / prompt+completion / text, "
                "or set data.format"
            )
        fmt = detected
    if fmt == "text":
        text = _str_field(data, "text", where, fmt)
        if not text.strip():
            raise DataError(f"{where}: field 'text' is empty")
        return Example(where, text=text)
    if fmt == "completion":
        completion = _str_field(data, "completion", where, fmt)
        if not completion.strip():
            raise DataError(f"{where}: field 'completion' is empty; there is nothing to learn")
        return Example(where, prompt=_str_field(data, "prompt", where, fmt), text=completion)
    if fmt == "alpaca":
        instruction = _str_field(data, "instruction", where, fmt)
        extra = _str_field(data, "input", where, fmt, required=False)
        messages = [{"role": "system", "content": _str_field(data, "system", where, fmt)}] if data.get("system") else []
        messages.append({"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction})
        output = _str_field(data, "output", where, fmt)
        if not output.strip():
            raise DataError(f"{where}: field 'output' is empty; there is nothing to learn")
        messages.append({"role": "assistant", "content": output})
        return Example(where, messages=messages)
    if fmt == "sharegpt":
        turns = data.get("conversations")
        key, role_key, content_key = "conversations", "from", "value"
    elif fmt == "messages":
        turns = data.get("messages")
        key, role_key, content_key = "messages", "role", "content"
    else:
        raise DataError(f"unknown data.format {fmt!r}; use auto or one of {FORMATS}")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field '{key}' must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        role = turn.get(role_key) if isinstance(turn, dict) else None
        content = turn.get(content_key) if isinstance(turn, dict) else None
        role = _SHAREGPT_ROLES.get(role) if fmt == "sharegpt" else role
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise DataError(
                f"{where}: {key}[{i}] must have '{role_key}' (system/user/assistant"
                f"{'/human/gpt' if fmt == 'sharegpt' else ''}) and a string '{content_key}', got {turn!r:.120}"
            )
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise DataError(f"{where}: field '{key}' has no non-empty assistant turn to learn from")
    return Example(where, messages=messages)
