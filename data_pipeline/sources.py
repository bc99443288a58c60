"""Read training records from wherever users keep them, lazily (a corpus larger than RAM streams).

    .jsonl             one JSON object per line
    .json              a JSON list of objects
    .txt / .md         documents separated by blank lines (continued pretraining)
    .parquet           rows of a parquet file (pyarrow, batch by batch)
    .csv / .tsv        through `datasets.load_dataset(..., streaming=True)`
    directory          every supported file in it, sorted; or a dataset saved with `save_to_disk`

Every record remembers where it came from (`file:line`, `file:[row]`) so that a malformed one can be
named precisely. Problems inside a file (bad JSON, bad UTF-8, a truncated last line) become records
carrying `__error__`, so `data.on_error=skip` can skip and count them; a problem with the file as a
whole (missing, empty, unsupported) raises DataError at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List

SUFFIXES = (".jsonl", ".json", ".txt", ".md", ".parquet", ".csv", ".tsv")
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Record:
    data: Dict[str, Any]
    where: str
    """file:line of the record's first line (file:[i] for rows of columnar files)."""


class DataError(ValueError):
    """A malformed input, with where it is and what was expected."""


def is_saved_dataset(path: Path) -> bool:
    """A directory written by `datasets.Dataset.save_to_disk` (or a DatasetDict's)."""
    return path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())


def list_files(path: str) -> List[Path]:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: no such file or directory (check data.path, data.sources or eval.sets)")
    if is_saved_dataset(p):
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
        if not files:
            raise DataError(f"{path}: directory has no {'/'.join(SUFFIXES)} files and is not a saved dataset")
        return files
    if p.suffix not in SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type {p.suffix!r}; use one of {', '.join(SUFFIXES)}, "
            "or a directory saved with datasets' save_to_disk"
        )
    if p.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    return [p]


def read_records(path: str, split: str = "train") -> Iterator[Record]:
    """Yield every record of a file, directory or saved dataset, in a stable order."""
    for file in list_files(path):
        if file.is_dir():
            yield from _read_saved_dataset(file, split)
        elif file.suffix in (".txt", ".md"):
            yield from _read_text(file)
        elif file.suffix == ".jsonl":
            yield from _read_jsonl(file)
        elif file.suffix == ".json":
            yield from _read_json(file)
        elif file.suffix == ".parquet":
            yield from _read_parquet(file)
        else:
            yield from _read_with_datasets(file)


def _lines(file: Path) -> Iterator[tuple]:
    """(line number, text or None, error or None, ends in a newline) for each line: bytes are decoded
    one line at a time so a bad byte is reported with its line; a UTF-8 BOM and CRLF are accepted."""
    with open(file, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as ex:
                yield (
                    lineno,
                    None,
                    (
                        f"not valid UTF-8 (byte 0x{raw[ex.start]:02x} at column {ex.start + 1}); "
                        "re-encode the file as UTF-8"
                    ),
                    True,
                )
                continue
            yield lineno, text.rstrip("\r\n"), None, raw.endswith(b"\n")


def _read_text(file: Path) -> Iterator[Record]:
    doc: List[str] = []
    start = 1
    for lineno, line, error, _ in _lines(file):
        if error:
            yield Record({"__error__": error}, f"{file}:{lineno}")
            continue
        if line.strip():
            if not doc:
                start = lineno
            doc.append(line)
        elif doc:
            yield Record({"text": "\n".join(doc)}, f"{file}:{start}")
            doc = []
    if doc:
        yield Record({"text": "\n".join(doc)}, f"{file}:{start}")


def _read_jsonl(file: Path) -> Iterator[Record]:
    for lineno, line, error, complete in _lines(file):
        where = f"{file}:{lineno}"
        if error:
            yield Record({"__error__": error}, where)
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as ex:
            hint = ""
            if not complete:  # only the last line of a file can lack its newline
                hint = "; it is the last line and has no newline: the file looks truncated (an interrupted write?)"
            yield Record({"__error__": f"not valid JSON ({ex.msg} at column {ex.colno}){hint}"}, where)
            continue
        if not isinstance(obj, dict):
            obj = {"__error__": f"expected a JSON object, got {type(obj).__name__}"}
        yield Record(obj, where)


def _read_json(file: Path) -> Iterator[Record]:
    raw = file.read_bytes()
    if raw.startswith(_BOM):
        raw = raw[len(_BOM) :]
    try:
        items = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as ex:
        line = raw[: ex.start].count(b"\n") + 1
        raise DataError(
            f"{file}:{line}: not valid UTF-8 (byte 0x{raw[ex.start]:02x}); re-encode the file as UTF-8"
        ) from None
    except json.JSONDecodeError as ex:
        raise DataError(f"{file}:{ex.lineno}: not valid JSON ({ex.msg} at column {ex.colno})") from None
    if not isinstance(items, list):
        raise DataError(
            f"{file}: expected a JSON list of records, got {type(items).__name__} "
            "(for one object per line, name the file .jsonl)"
        )
    for i, obj in enumerate(items):
        yield Record(
            obj if isinstance(obj, dict) else {"__error__": f"expected a JSON object, got {type(obj).__name__}"},
            f"{file}:[{i}]",
        )


def _read_parquet(file: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(file).iter_batches(batch_size=4096):
        for obj in batch.to_pylist():
            yield Record(obj, f"{file}:[{row}]")
            row += 1


def _read_with_datasets(file: Path) -> Iterator[Record]:
    from datasets import load_dataset

    kind = {".csv": "csv", ".tsv": "csv"}[file.suffix]
    kwargs = {"delimiter": "\t"} if file.suffix == ".tsv" else {}
    stream = load_dataset(kind, data_files=str(file), split="train", streaming=True, **kwargs)
    for i, obj in enumerate(stream):
        yield Record(obj, f"{file}:{i + 2}")  # line 1 is the header


def _read_saved_dataset(directory: Path, split: str) -> Iterator[Record]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(directory))
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise DataError(f"{directory}: saved DatasetDict has splits {sorted(ds)}, not {split!r}; set data.split")
        ds = ds[split]
    for i, obj in enumerate(ds):
        yield Record(obj, f"{directory}[{split}]:[{i}]")
