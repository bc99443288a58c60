"""Read training records from files: .jsonl, .json (a list of objects), .txt (documents separated
by blank lines), or a directory of them. Every record remembers where it came from (file:line) so
that a malformed one can be named precisely."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List

SUFFIXES = (".jsonl", ".json", ".txt")


@dataclass(frozen=True)
class Record:
    data: Dict[str, Any]
    where: str
    """file:line of the record's first line."""


class DataError(ValueError):
    """A malformed input, with where it is and what was expected."""


def list_files(path: str) -> List[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
        if not files:
            raise DataError(f"{path}: directory has no {'/'.join(SUFFIXES)} files")
        return files
    if not p.exists():
        raise DataError(f"{path}: no such file or directory (check data.path / eval.sets)")
    if p.suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {p.suffix!r}; use one of {', '.join(SUFFIXES)}")
    return [p]


def read_records(path: str) -> Iterator[Record]:
    """Yield every record of a file or directory, in a stable order."""
    for file in list_files(path):
        if file.suffix == ".txt":
            yield from _read_text(file)
        elif file.suffix == ".jsonl":
            yield from _read_jsonl(file)
        else:
            yield from _read_json(file)


def _read_text(file: Path) -> Iterator[Record]:
    doc: List[str] = []
    start = 1
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                if not doc:
                    start = lineno
                doc.append(line.rstrip("\n"))
            elif doc:
                yield Record({"text": "\n".join(doc)}, f"{file}:{start}")
                doc = []
    if doc:
        yield Record({"text": "\n".join(doc)}, f"{file}:{start}")


def _read_jsonl(file: Path) -> Iterator[Record]:
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as ex:
                yield Record({"__error__": f"not valid JSON ({ex.msg} at column {ex.colno})"}, f"{file}:{lineno}")
                continue
            if not isinstance(obj, dict):
                obj = {"__error__": f"expected a JSON object, got {type(obj).__name__}"}
            yield Record(obj, f"{file}:{lineno}")


def _read_json(file: Path) -> Iterator[Record]:
    with open(file, encoding="utf-8") as f:
        try:
            items = json.load(f)
        except json.JSONDecodeError as ex:
            raise DataError(f"{file}:{ex.lineno}: not valid JSON ({ex.msg})") from None
    if not isinstance(items, list):
        raise DataError(f"{file}: expected a JSON list of records, got {type(items).__name__}")
    for i, obj in enumerate(items):
        yield Record(obj if isinstance(obj, dict) else {"__error__": "expected a JSON object"}, f"{file}:[{i}]")
