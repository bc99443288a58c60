"""Read training records from wherever users keep them, lazily (a corpus larger than RAM streams).

    .jsonl             one JSON object per line
    .json              a JSON list of objects
    .txt / .md         documents separated by blank lines (continued pretraining)
    .jsonl.gz .jsonl.zst .txt.gz .txt.zst .md.gz .md.zst
                       the same, decompressed as they are read (gzip; zstandard)
    .parquet           rows of a parquet file (pyarrow, one row group's batch at a time)
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
from typing import Any, Dict, Iterator, List, Optional

SUFFIXES = (".jsonl", ".json", ".txt", ".md", ".parquet", ".csv", ".tsv")
COMPRESSED = (".gz", ".zst")
"""Streams these wrap: .jsonl, .txt and .md files compressed whole (gzip, zstandard)."""
_STREAMED = (".jsonl", ".txt", ".md")
_BOM = b"\xef\xbb\xbf"


def kind(file: Path) -> str:
    """What a file holds: its suffix, or for a compressed one the suffix under it (a.jsonl.gz: .jsonl);
    "" for what cannot be read (a.json.gz: read .json whole, so it is not offered compressed)."""
    if file.suffix in COMPRESSED:
        inner = Path(file.stem).suffix
        return inner if inner in _STREAMED else ""
    return file.suffix if file.suffix in SUFFIXES else ""


def _open_bytes(file: Path):
    """The file's bytes as a binary stream, decompressed on the fly (bounded memory)."""
    if file.suffix == ".gz":
        import gzip

        return gzip.open(file, "rb")
    if file.suffix == ".zst":
        return _ZstdLines(file)
    return open(file, "rb")


class _ZstdLines:
    """The lines of a zstandard file, decompressed a chunk at a time; a stream that ends inside a frame
    raises EOFError (the library's own reader would end quietly on a cut-short file)."""

    def __init__(self, file: Path) -> None:
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{file}: reading .zst needs the zstandard package: pip install zstandard") from None
        self.file, self.zstandard = file, zstandard

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def __iter__(self) -> Iterator[bytes]:
        rest = b""
        with open(self.file, "rb") as f:
            stream = self.zstandard.ZstdDecompressor().decompressobj()
            while chunk := f.read(1 << 20):
                while chunk:  # a file may hold several frames, one after another
                    if stream.eof:
                        stream = self.zstandard.ZstdDecompressor().decompressobj()
                    rest += stream.decompress(chunk)
                    chunk = stream.unused_data if stream.eof else b""
                *lines, rest = rest.split(b"\n")
                yield from (line + b"\n" for line in lines)
            if not stream.eof:
                raise EOFError("the file ends inside a zstandard frame")
        if rest:
            yield rest


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
        files = sorted(f for f in p.rglob("*") if f.is_file() and kind(f))
        if not files:
            raise DataError(f"{path}: directory has no {'/'.join(SUFFIXES)} files and is not a saved dataset")
        return files
    if not kind(p):
        raise DataError(
            f"{path}: unsupported file type {''.join(p.suffixes[-2:])!r}; use one of {', '.join(SUFFIXES)} "
            f"(.jsonl, .txt and .md also as {' or '.join(COMPRESSED)}), or a directory saved with datasets' "
            "save_to_disk"
        )
    if p.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    return [p]


@dataclass(frozen=True)
class Unit:
    """A piece of a source that one worker (or one Slurm array task) reads on its own: a whole file, or
    the lines of a plain .jsonl/.txt/.md file that start in bytes [start, end). Read one after another
    in plan order, the units give exactly the records of read_records()."""

    file: str
    start: int = 0
    end: int = -1
    """-1: the whole file. For a parquet file: row groups [start, end)."""
    first_line: int = 1
    """The line number of the line at `start` (records keep their file:line); for parquet the index
    of the first row (file:[row])."""
    size: int = 0
    """Its bytes on disk (compressed, for parquet row groups): for progress and load balance."""


def plan_units(path: str, unit_bytes: int = 64 << 20) -> List[Unit]:
    """The source cut into units of about `unit_bytes`: plain .jsonl files at line starts, plain .txt /
    .md files at blank lines (a document never spans two units), parquet files at row groups; every
    other file is one unit. The cut points depend only on the files and `unit_bytes`, never on how
    many workers read them."""
    units: List[Unit] = []
    for file in list_files(path):
        file = file.resolve()  # the plan is stored and read back by processes started elsewhere
        size = file.stat().st_size if file.is_file() else sum(q.stat().st_size for q in file.rglob("*") if q.is_file())
        if file.suffix == ".parquet" and size > unit_bytes:
            units += _row_group_units(file, unit_bytes)
            continue
        if file.suffix not in _STREAMED or size <= unit_bytes:
            units.append(Unit(str(file), size=size))
            continue
        sep = b"\n" if file.suffix == ".jsonl" else b"\n\n"
        cuts = [0]
        with open(file, "rb") as f:
            while cuts[-1] + unit_bytes < size:
                f.seek(cuts[-1] + unit_bytes)
                at = _find(f, sep)
                if at < 0:
                    break
                cuts.append(at + 1)  # the byte after a newline: a line start (a blank line for text)
        lines = _count_newlines(file, cuts)
        for i, start in enumerate(cuts):
            end = cuts[i + 1] if i + 1 < len(cuts) else -1
            units.append(Unit(str(file), start, end, lines[i] + 1, (size if end < 0 else end) - start))
    return units


def _row_group_units(file: Path, unit_bytes: int) -> List[Unit]:
    """Consecutive row groups of about `unit_bytes` (compressed, from the footer) per unit."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(file).metadata
    units, first, rows, acc, row = [], 0, 0, 0, 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        acc += sum(group.column(c).total_compressed_size for c in range(group.num_columns))
        rows += group.num_rows
        if acc >= unit_bytes or g == meta.num_row_groups - 1:
            units.append(Unit(str(file), first, g + 1, row, acc))
            first, row, acc = g + 1, row + rows, 0
            rows = 0
    return units


def _find(f, sep: bytes) -> int:
    """The offset of the next `sep` from the file's position, or -1."""
    pos, tail = f.tell(), b""
    while block := f.read(1 << 20):
        hit = (tail + block).find(sep)
        if hit >= 0:
            return pos - len(tail) + hit
        pos += len(block)
        tail = block[-(len(sep) - 1) :] if len(sep) > 1 else b""
    return -1


def _count_newlines(file: Path, offsets: List[int]) -> List[int]:
    """The newlines before each of the ascending `offsets` (one pass over the file)."""
    out, seen, pos = [], 0, 0
    with open(file, "rb") as f:
        for target in offsets:
            while pos < target:
                block = f.read(min(1 << 20, target - pos))
                seen += block.count(b"\n")
                pos += len(block)
            out.append(seen)
    return out


def read_unit(unit: Unit, split: str = "train") -> Iterator[Record]:
    """The records of one unit (plan_units)."""
    file = Path(unit.file)
    if unit.start == 0 and unit.end < 0:
        yield from _read_file(file, split)
    elif file.suffix == ".parquet":
        yield from _read_parquet(file, unit)
    elif kind(file) == ".jsonl":
        yield from _read_jsonl(file, unit)
    else:
        yield from _read_text(file, unit)


def read_records(path: str, split: str = "train") -> Iterator[Record]:
    """Yield every record of a file, directory or saved dataset, in a stable order."""
    for file in list_files(path):
        yield from _read_file(file, split)


def _read_file(file: Path, split: str) -> Iterator[Record]:
    if file.is_dir():
        yield from _read_saved_dataset(file, split)
    elif kind(file) in (".txt", ".md"):
        yield from _read_text(file)
    elif kind(file) == ".jsonl":
        yield from _read_jsonl(file)
    elif file.suffix == ".json":
        yield from _read_json(file)
    elif file.suffix == ".parquet":
        yield from _read_parquet(file)
    else:
        yield from _read_with_datasets(file)


def _lines(file: Path, unit: Optional[Unit] = None) -> Iterator[tuple]:
    """(line number, text or None, error or None, ends in a newline) for each line (of `unit`: those
    starting in its byte range): bytes are decoded one line at a time so a bad byte is reported with
    its line; a UTF-8 BOM and CRLF are accepted. A damaged or truncated compressed stream stops with
    the last line read."""
    start, end, first = (unit.start, unit.end, unit.first_line) if unit else (0, -1, 1)
    lineno = first - 1
    with _open_bytes(file) as f:
        if start:
            f.seek(start)
        lines = enumerate(_until(f, start, end), first)
        while True:
            try:
                lineno, raw = next(lines)
            except StopIteration:
                return
            except _stream_errors(file) as ex:
                raise DataError(
                    f"{file}:{lineno + 1}: the compressed stream is damaged or cut short after line {lineno} ({ex}); "
                    "recompress the file, or remove it from the source"
                ) from None
            if lineno == 1 and start == 0 and raw.startswith(_BOM):
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


def _until(f, start: int, end: int) -> Iterator[bytes]:
    """The lines of `f` from `start` that start before `end` (-1: all)."""
    if end < 0:
        yield from f
        return
    pos = start
    for raw in f:
        if pos >= end:
            return
        yield raw
        pos += len(raw)


def _stream_errors(file: Path) -> tuple:
    """What a damaged or cut-short compressed file raises while it is read (none for a plain file:
    a disk error there is not the file's fault and propagates as it is)."""
    if file.suffix not in COMPRESSED:
        return ()
    import zlib

    errors = (EOFError, OSError, zlib.error)
    try:
        import zstandard

        return errors + (zstandard.ZstdError,)
    except ImportError:
        return errors


def _read_text(file: Path, unit: Optional[Unit] = None) -> Iterator[Record]:
    doc: List[str] = []
    start = 1
    for lineno, line, error, _ in _lines(file, unit):
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


def _read_jsonl(file: Path, unit: Optional[Unit] = None) -> Iterator[Record]:
    for lineno, line, error, complete in _lines(file, unit):
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


def _read_parquet(file: Path, unit: Optional[Unit] = None) -> Iterator[Record]:
    """Rows a 4,096-row batch at a time (of `unit`'s row groups: [start, end))."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(file)
    groups = None if unit is None else list(range(unit.start, unit.end))
    row = 0 if unit is None else unit.first_line
    for batch in pf.iter_batches(batch_size=4096, row_groups=groups):
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
