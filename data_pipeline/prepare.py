"""Prepare once: read -> normalise -> tokenize -> pack a source into memory-mapped arrays on disk,
with a manifest, so training (every rank, every rerun) maps the result instead of re-tokenizing.

    <cache>/<key>/manifest.json        what went in (source fingerprints, tokenizer, options) and
                                       what came out (counts, rows, tokens, packing efficiency)
    <cache>/<key>/input_ids.npy        uint32 [rows, seq_len]
    <cache>/<key>/supervised.npy       bool   [rows, seq_len]   label = token where True, else -100
    <cache>/<key>/position_ids.npy     uint16/int32 [rows, seq_len], restarting at 0 per document
    <cache>/<key>/filled.npy           int64  [rows]            real (non-padding) tokens per row
    <cache>/<key>/document.npy         int16  [rows, seq_len]   preference pairs only: the document of each
                                       token in its row (pair k = documents 2k chosen, 2k+1 rejected; -1 pad)
    <cache>/<key>/reference/<model>.npy  preference pairs only: the reference model's log-probs per
                                       document, written by the trainer (trainer/objectives/reference.py)

`key` hashes the source files (path, size, mtime, first and last MiB), the tokenizer (vocabulary,
merges, special tokens, chat template) and every option that changes the rows, so a matching cache
is reused and anything else prepares afresh.

Tokenized samples stream to flat files on disk before packing, so a corpus larger than RAM only
needs its sample lengths in memory. In a multi-rank job one process per cache directory prepares
(an O_EXCL lock file) while the others wait on the filesystem, never inside a collective: a long
tokenization cannot trip the NCCL/gloo timeout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from data_pipeline import filesync, preference
from data_pipeline.choices import DataFormat, OnError, Overlong, StageObjective, parse
from data_pipeline.formats import normalise
from data_pipeline.packing import IGNORE, best_fit_decreasing
from data_pipeline.sources import DataError, Unit, list_files, plan_units, read_records, read_unit
from data_pipeline.tokenization import check_chat_template, encode

log = logging.getLogger("data_pipeline")

VERSION = 2  # bump when the on-disk layout or the meaning of a row changes
_FLUSH_TOKENS = 1 << 20


@dataclass(frozen=True)
class PrepareOptions:
    """Everything besides the source and the tokenizer that decides the rows."""

    objective: StageObjective
    """pretrain (all tokens, documents chunked) | sft (final answer) | instruct (assistant turns) |
    dpo (preference pairs, data_pipeline/preference.py)."""
    seq_len: int
    """Tokens per row."""
    fmt: DataFormat = DataFormat.auto
    """Record format, or auto to detect per record."""
    on_error: OnError = OnError("raise")
    """raise | skip (count) malformed records."""
    overlong: Overlong = Overlong.truncate
    """truncate | drop | split (pretraining only) samples longer than seq_len."""
    packing: bool = True
    """False: one sample per row, padded (baseline; needs no attention isolation)."""
    system_prompt: Optional[str] = None
    """Added as the system turn of conversations that have none."""
    split: str = "train"
    """Split of a saved DatasetDict."""

    def __post_init__(self) -> None:
        # Strings (a script's, a test's) become members; an unknown word is an error, never a fallback.
        # (frozen: set through object.__setattr__, once, here)
        object.__setattr__(self, "objective", parse(StageObjective, self.objective, "objective"))
        object.__setattr__(self, "fmt", parse(DataFormat, self.fmt, "data.format"))
        object.__setattr__(self, "on_error", parse(OnError, self.on_error, "data.on_error"))
        object.__setattr__(self, "overlong", parse(Overlong, self.overlong, "data.overlong"))
        if self.overlong == Overlong.auto:
            raise ValueError(
                "overlong=auto is resolved by the stage (Config.overlong_for): pass truncate, drop or split"
            )


class Prepared:
    """A prepared source, memory-mapped: rows are read lazily by index."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.manifest = json.loads((directory / "manifest.json").read_text())
        self.input_ids = np.load(directory / "input_ids.npy", mmap_mode="r")
        self.supervised = np.load(directory / "supervised.npy", mmap_mode="r")
        self.position_ids = np.load(directory / "position_ids.npy", mmap_mode="r")
        self.filled = np.load(directory / "filled.npy")
        pairs = directory / "document.npy"
        self.document = np.load(pairs, mmap_mode="r") if pairs.exists() else None
        self.reference: Optional[np.ndarray] = None
        """float64 [rows, documents]: the reference model's log-prob of each document's completion,
        attached by the trainer before training (trainer/objectives/reference.py)."""

    @property
    def is_preference(self) -> bool:
        return self.document is not None

    @property
    def documents_per_row(self) -> int:
        """The most documents a row holds (preference pairs: twice the most pairs)."""
        return int(self.manifest["stats"].get("documents_per_row", 0))

    def __len__(self) -> int:
        return len(self.filled)

    @property
    def stats(self) -> Dict[str, float]:
        return self.manifest["stats"]

    def rows(self, idx) -> Dict[str, np.ndarray]:
        """int64 input_ids, labels (-100 where not learned) and position_ids of the given rows."""
        idx = np.asarray(idx)
        ids = self.input_ids[idx].astype(np.int64)
        out = {
            "input_ids": ids,
            "labels": np.where(self.supervised[idx], ids, IGNORE),
            "position_ids": self.position_ids[idx].astype(np.int64),
        }
        if self.document is not None:
            out["document"] = self.document[idx].astype(np.int64)
            if self.reference is not None:
                out["reference"] = self.reference[idx]
        return out


# ---- cache key ----------------------------------------------------------------------------------


def _file_fingerprint(path: Path) -> Dict:
    if path.is_dir():  # a saved dataset: its arrow files and state
        return {"path": str(path), "files": [_file_fingerprint(p) for p in sorted(path.rglob("*")) if p.is_file()]}
    st = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        if st.st_size > 2 << 20:
            f.seek(-(1 << 20), 2)
            digest.update(f.read())
    return {
        "path": str(path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256_head_tail": digest.hexdigest(),
    }


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [
        backend.to_str() if backend is not None else repr(tokenizer.get_vocab()),
        str(tokenizer.chat_template),
        repr(sorted(tokenizer.special_tokens_map.items())),
        str(tokenizer.eos_token_id),
        str(tokenizer.pad_token_id),
    ]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def cache_key(path: str, tokenizer, options: PrepareOptions) -> tuple:
    sources = [_file_fingerprint(f) for f in list_files(path)]
    identity = {
        "version": VERSION,
        "sources": sources,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "options": asdict(options),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20], identity


# ---- prepare or wait ----------------------------------------------------------------------------


def prepare(
    path: str,
    tokenizer,
    options: PrepareOptions,
    cache_dir: str,
    preparer: bool = True,
    timeout_s: float = 7200.0,
    progress: bool = False,
    workers: int = 1,
) -> Prepared:
    """The prepared rows for `path`, from the cache when it matches. With preparer=False (ranks
    other than the node's first) only wait for another process to finish preparing. `workers`:
    processes that tokenize (0: usable_cores()); the rows do not depend on it."""
    key, identity = cache_key(path, tokenizer, options)
    target = Path(cache_dir) / key
    if (target / "manifest.json").exists():
        return Prepared(target)
    lock = target.with_name(key + ".lock")
    if preparer and filesync.take_lock(lock):
        try:
            if not (target / "manifest.json").exists():
                _prepare_into(target, path, tokenizer, options, identity, progress, workers or usable_cores())
        finally:
            filesync.release_lock(lock)
        return Prepared(target)
    return _wait_for(target, lock, path, timeout_s)


def prepare_shard(
    path: str,
    tokenizer,
    options: PrepareOptions,
    cache_dir: str,
    shard: int,
    shards: int,
    workers: int = 0,
    progress: bool = False,
) -> str:
    """Task `shard` of `shards` (a Slurm array task, launch/prepare_data.py --shard): tokenize the
    source's units whose index is `shard` modulo `shards` into its units directory, without the lock
    and without packing; a later prepare() (the merge) finds them finished and packs. Preference
    pairs are tokenized by the merge alone. Returns what it did, for the log."""
    key, _ = cache_key(path, tokenizer, options)
    target = Path(cache_dir) / key
    if (target / "manifest.json").exists():
        return f"{path}: already prepared -> {target}"
    if options.objective == StageObjective.dpo:
        return f"{path}: preference pairs, tokenized by the merge"
    where = units_dir(target)
    mine = lambda i: i % shards == shard  # noqa: E731
    units = tokenize_units(path, tokenizer, options, where, workers, mine=mine, progress=progress)
    left = len(missing_units(where, len(units)))
    return f"{path}: units {shard}::{shards} of {len(units)} tokenized -> {where} ({left} left for other tasks)"


def _wait_for(target: Path, lock: Path, path: str, timeout_s: float) -> Prepared:
    """Until the process that holds `lock` has renamed the prepared `target` into place."""
    polls_without_lock = 0

    def preparer_alive() -> None:
        # No lock is not yet a failure: a rank that only waits can get here before the preparer has
        # taken it. A lock missing for 30 polls running, with no manifest, means the preparer stopped.
        nonlocal polls_without_lock
        polls_without_lock = 0 if lock.exists() else polls_without_lock + 1
        if polls_without_lock > 30:  # no one is preparing and nothing appeared
            raise DataError(
                f"{path}: waited for another process to prepare it into {target}, but that "
                "process stopped without finishing; see its log (usually rank 0's)"
            )

    filesync.wait_until(
        lambda: (target / "manifest.json").exists(),
        poll_s=1.0,
        check=preparer_alive,
        timeout_s=timeout_s,
        timeout_error=lambda: DataError(
            f"{path}: still being prepared after {timeout_s:.0f} s (lock {lock}). If no process "
            "is preparing it, delete the lock; to prepare ahead of time run "
            "`python launch/prepare_data.py <same overrides>`"
        ),
    )
    return Prepared(target)


# ---- the pipeline -------------------------------------------------------------------------------


def _prepare_into(
    target: Path, path: str, tokenizer, options: PrepareOptions, identity: Dict, progress: bool, workers: int = 1
) -> None:
    started = time.time()
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        extra = {}
        if options.objective == StageObjective.dpo:
            pairs, counts = _tokenize_pairs(path, tokenizer, options, progress)
            rows, extra["documents_per_row"] = preference.write_pairs(
                work, pairs, options.seq_len, options.packing, tokenizer.pad_token_id
            )
            lengths = np.asarray([2 * len(p) + len(c) + len(r) for p, c, r in pairs], dtype=np.int64)
            extra["pairs"] = len(pairs)
        else:
            where = units_dir(target)
            units = tokenize_units(path, tokenizer, options, where, workers, progress=progress)
            damaged = [i for i in range(len(units)) if not unit_done(where / f"{i:06d}")]  # each read once here
            if damaged:  # set aside, then tokenized again
                for i in damaged:
                    os.replace(where / f"{i:06d}", Path(tempfile.mkdtemp(dir=where, prefix=".damaged.")) / "unit")
                tokenize_units(path, tokenizer, options, where, workers, mine=set(damaged).__contains__)
            lengths, counts = _merge_units(path, where, len(units), work)
            tokens = np.memmap(work / "tokens.u32", dtype=np.uint32, mode="r")
            mask = np.memmap(work / "mask.u8", dtype=np.uint8, mode="r")
            if options.objective == StageObjective.pretrain:
                rows = _write_chunked(work, tokens, mask, lengths, options.seq_len, tokenizer.pad_token_id)
            else:
                rows = _write_packed(work, tokens, mask, lengths, options, tokenizer.pad_token_id)
            del tokens, mask
            (work / "tokens.u32").unlink()
            (work / "mask.u8").unlink()
        supervised = np.load(work / "supervised.npy", mmap_mode="r")
        real = int(lengths.sum())
        stats = dict(
            counts,
            **extra,
            samples=int(len(lengths)),
            rows=int(rows),
            real_tokens=real,
            supervised_tokens=int(np.count_nonzero(supervised)),
            packing_efficiency=real / max(rows * options.seq_len, 1),
        )
        del supervised
        manifest = {
            **identity,
            "stats": stats,
            "seconds": round(time.time() - started, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "seq_len": options.seq_len,
        }
        (work / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if target.exists():  # a leftover without a manifest (it is only ever renamed in whole)
            shutil.rmtree(target)
        os.replace(work, target)  # atomic: readers see a complete directory or none
        if options.objective != StageObjective.dpo:
            shutil.rmtree(units_dir(target), ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info(
        "%s: prepared %d samples -> %d rows of %d tokens in %.1f s, packing efficiency %.4f, counts %s",
        path,
        stats["samples"],
        rows,
        options.seq_len,
        manifest["seconds"],
        stats["packing_efficiency"],
        {k: v for k, v in counts.items() if k != "records"},
    )


def units_dir(target: Path) -> Path:
    """Where the units of a preparation into `target` keep their tokenized shards until the merge."""
    return target.with_name(target.name + ".units")


def unit_bytes_for(total: int) -> int:
    """About 64 units a source (load balance for up to ~32 workers), each 1-256 MiB. It depends on the
    source's size only: every worker count and every array task plans the same units."""
    return int(min(max(total // 64, 1 << 20), 256 << 20))


def plan(path: str, where: Path) -> List[Unit]:
    """The source's units: stored in `where`/plan.json by the first process to plan them, read back by
    every later one (a resume, the other array tasks, the merge)."""
    stored = where / "plan.json"
    files = sorted(str(f.resolve()) for f in list_files(path))
    try:
        units = [Unit(**u) for u in json.loads(stored.read_text())]
        if sorted({u.file for u in units}) == files:
            return units
        log.warning("%s: its stored plan names other files than the source has now; planning again", stored)
    except (OSError, ValueError, TypeError):
        pass  # none yet, or unreadable: plan (the plan depends on the files only, so any process plans alike)
    units = plan_units(path, unit_bytes_for(_input_bytes(path)))
    where.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=where, prefix=".plan.", suffix=".tmp")  # unique across nodes sharing `where`
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps([asdict(u) for u in units]))
    os.replace(tmp, stored)
    return units


def tokenize_units(
    path: str, tokenizer, options: PrepareOptions, where: Path, workers: int, mine=None, progress: bool = False
) -> List[Unit]:
    """Tokenize the units of `path` (those `mine(index)` picks; all by default) that have no finished
    shard in `where` yet, each into `where`/<index>/ (tokens, mask, lengths, counts; renamed into place
    whole, so a killed preparation resumes from the finished ones), on `workers` processes (1: this
    one; 0: every usable core; a source under POOL_MIN_BYTES always in this one). Returns the plan."""
    units = plan(path, where)
    todo = [i for i in range(len(units)) if (mine is None or mine(i)) and not (where / f"{i:06d}" / "done").is_file()]
    workers = workers or usable_cores()
    if sum(units[i].size for i in todo) < POOL_MIN_BYTES:
        workers = 1  # a pool's start (each worker imports transformers: seconds) would cost more than it saves
    workers = min(workers, len(todo)) or 1
    bar = _progress_bar(path, progress, total=sum(units[i].size for i in todo))
    started, tokens = time.time(), 0
    jobs = [(i, units[i], where) for i in todo]
    if workers == 1:
        results = (_tokenize_unit(job, tokenizer, options) for job in jobs)
        pool = None
    else:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads (torch, gloo, tokenizers)
        # One thread per worker: the workers are the parallelism (the tokenizer's own Rust threads and
        # torch's would oversubscribe the cores). Spawned workers take the environment as it is when
        # they start, before the tokenizer reaches them (and is imported).
        single = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        saved = {k: os.environ.get(k) for k in single}
        os.environ.update(single)
        try:
            pool = ctx.Pool(workers, initializer=_worker_init, initargs=(tokenizer, options))
        finally:
            for k, v in saved.items():
                if v is None:
                    del os.environ[k]
                else:
                    os.environ[k] = v
        results = pool.imap(_worker_unit, jobs)  # in unit order: the first failing unit's error is raised
    try:
        for i, made in zip(todo, results):
            tokens += made
            bar.update(units[i].size)
            bar.set_postfix_str(f"{tokens / max(time.time() - started, 1e-9):,.0f} tokens/s", refresh=False)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        bar.close()
    return units


POOL_MIN_BYTES = 8 << 20
"""Sources smaller than this are tokenized in the preparing process whatever `workers` says."""


def _input_bytes(path: str) -> int:
    files = list_files(path)
    return sum(q.stat().st_size for f in files for q in ([f] if f.is_file() else f.rglob("*")) if q.is_file())


_worker_state: Dict = {}


def _worker_init(tokenizer, options: PrepareOptions) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s worker %(process)d: %(message)s")
    _worker_state["tokenizer"], _worker_state["options"] = tokenizer, options


def _worker_unit(job) -> int:
    return _tokenize_unit(job, _worker_state["tokenizer"], _worker_state["options"])


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a Slurm allocation's), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _encode_record(record, tokenizer, options: PrepareOptions):
    """(ids, labels) of one record, or the DataError that makes it malformed."""
    try:
        example = normalise(record, options.fmt)
        if example.messages is not None:
            check_chat_template(tokenizer, record.where)
            if options.system_prompt and example.messages[0]["role"] != "system":
                example.messages.insert(0, {"role": "system", "content": options.system_prompt})
        return encode(tokenizer, example, options.objective)
    except DataError as ex:
        return ex


def _tokenize_unit(job, tokenizer, options: PrepareOptions) -> int:
    """Append every usable sample's tokens and supervision mask of one unit to its shard's flat files,
    with the lengths and the counts of what was skipped, truncated or dropped (nothing is lost
    silently); returns the tokens written."""
    index, unit, where = job
    shard = where / f"{index:06d}"
    work = Path(tempfile.mkdtemp(dir=where, prefix=f".{index:06d}.", suffix=".tmp"))
    counts: Counter = Counter()
    lengths: List[int] = []
    buf_ids: List[int] = []
    buf_mask: List[int] = []
    seq_len = options.seq_len
    try:
        with open(work / "tokens.u32", "wb") as f_ids, open(work / "mask.u8", "wb") as f_mask:
            for record in read_unit(unit, options.split):
                counts["records"] += 1
                encoded = _encode_record(record, tokenizer, options)
                if isinstance(encoded, DataError):
                    _skip_malformed(encoded, options.on_error, counts)
                    continue
                ids, labels = encoded
                if len(ids) > seq_len and options.overlong != Overlong.split:
                    if options.overlong == Overlong.drop:
                        counts["dropped_overlong"] += 1
                        continue
                    ids, labels = ids[:seq_len], labels[:seq_len]
                    counts["truncated_overlong"] += 1
                elif len(ids) > seq_len:
                    counts["split_overlong"] += 1
                if all(t == IGNORE for t in labels[1:]):
                    # Nothing left to learn (e.g. truncation cut the whole answer): never reaches the loss.
                    counts["dropped_no_supervised_tokens"] += 1
                    continue
                lengths.append(len(ids))
                buf_ids.extend(ids)
                buf_mask.extend(t != IGNORE for t in labels)
                if len(buf_ids) >= _FLUSH_TOKENS:
                    f_ids.write(np.asarray(buf_ids, dtype=np.uint32).tobytes())
                    f_mask.write(np.asarray(buf_mask, dtype=np.uint8).tobytes())
                    buf_ids.clear()
                    buf_mask.clear()
            f_ids.write(np.asarray(buf_ids, dtype=np.uint32).tobytes())
            f_mask.write(np.asarray(buf_mask, dtype=np.uint8).tobytes())
        np.save(work / "lengths.npy", np.asarray(lengths, dtype=np.int64))
        (work / "counts.json").write_text(json.dumps({**counts, "unit": asdict(unit)}))
        (work / "done").write_text(json.dumps({name: _digest(work / name) for name in _UNIT_FILES}))
        if (shard / "done").is_file():  # another process (a requeued task's twin) finished it meanwhile
            shutil.rmtree(work, ignore_errors=True)
        else:
            if shard.exists():  # a damaged one, set aside under a name of its own before ours goes in
                os.replace(shard, Path(tempfile.mkdtemp(dir=where, prefix=".damaged.")) / "unit")
            try:
                os.replace(work, shard)
            except OSError:  # the twin got there between the check and the rename
                if not (shard / "done").is_file():
                    raise
                shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return int(sum(lengths))


def missing_units(where: Path, n: int) -> List[int]:
    """Units without a finished shard (not checked for damage: unit_done does that, once, at the merge)."""
    return [i for i in range(n) if not (where / f"{i:06d}" / "done").is_file()]


_UNIT_FILES = ("tokens.u32", "mask.u8", "lengths.npy", "counts.json")


def _digest(path: Path) -> List:
    """[size, sha256] of a file, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return [path.stat().st_size, h.hexdigest()]


def unit_done(shard: Path) -> bool:
    """A unit's shard is finished and intact: its files have the sizes and sha256 its `done` records
    (written last, renamed in with the rest). A damaged one is logged and tokenized again."""
    try:
        recorded = json.loads((shard / "done").read_text())
    except (OSError, ValueError):
        return False
    bad = [name for name in _UNIT_FILES if not (shard / name).is_file() or _digest(shard / name) != recorded.get(name)]
    if bad:
        log.warning("%s: %s do not match the unit's record (damaged); tokenizing the unit again", shard, ", ".join(bad))
    return not bad


def _merge_units(path: str, where: Path, n: int, work: Path):
    """The units' shards concatenated in unit order into `work`'s flat files: the same bytes as one
    process reading the source from start to end. Returns the lengths and the summed counts."""
    missing = missing_units(where, n)
    if missing:
        raise DataError(
            f"{path}: {len(missing)} of its {n} units are not tokenized yet (units {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''} in {where}); prepare them first (python launch/prepare_data.py "
            "<same overrides>, or rerun the array tasks that own them)"
        )
    counts: Counter = Counter()
    lengths = []
    with open(work / "tokens.u32", "wb") as f_ids, open(work / "mask.u8", "wb") as f_mask:
        for i in range(n):
            shard = where / f"{i:06d}"
            for name, out in (("tokens.u32", f_ids), ("mask.u8", f_mask)):
                with open(shard / name, "rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
            lengths.append(np.load(shard / "lengths.npy"))
            unit_counts = json.loads((shard / "counts.json").read_text())
            unit_counts.pop("unit", None)
            counts.update(unit_counts)
    if counts["skipped_malformed"] > 10:
        log.warning(
            "%s: %d malformed records skipped in all (at most 10 shown per unit)", path, counts["skipped_malformed"]
        )
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    if not len(lengths):
        raise DataError(f"{path}: no usable samples out of {counts['records']} records ({dict(counts)})")
    return lengths, counts


def _tokenize_pairs(path: str, tokenizer, options: PrepareOptions, progress: bool):
    """Every usable preference pair as (prompt, chosen, rejected) token lists, and the counts of what
    was skipped, truncated or dropped. A pair is one unit: it is never split across rows."""
    counts: Counter = Counter()
    pairs: List[tuple] = []
    chat_checked = False
    bar = _progress_bar(path, progress)
    for record in read_records(path, options.split):
        counts["records"] += 1
        bar.update(1)
        try:
            pair = preference.normalise_pair(record)
            if pair.conversational and not chat_checked:
                check_chat_template(tokenizer, record.where)
                chat_checked = True
            prompt, chosen, rejected = preference.encode_pair(tokenizer, pair, options.system_prompt)
        except DataError as ex:
            _skip_malformed(ex, options.on_error, counts)
            continue
        if 2 * len(prompt) + len(chosen) + len(rejected) > options.seq_len:
            keep = preference.fit_pair(len(prompt), len(chosen), len(rejected), options.seq_len)
            if options.overlong == Overlong.drop or keep is None:
                counts["dropped_overlong"] += 1  # drop, or a prompt too long to leave room for both answers
                continue
            chosen, rejected = chosen[:keep], rejected[:keep]
            counts["truncated_overlong"] += 1
        pairs.append((prompt, chosen, rejected))
    bar.close()
    if counts["skipped_malformed"] > 10:
        log.warning("%s: %d malformed records skipped in all (first 10 shown)", path, counts["skipped_malformed"])
    if not pairs:
        raise DataError(f"{path}: no usable preference pairs out of {counts['records']} records ({dict(counts)})")
    return pairs, counts


def _skip_malformed(ex: DataError, on_error: OnError, counts: Counter) -> None:
    """data.on_error for one malformed record: raise (naming the setting that skips instead), or
    count it in counts["skipped_malformed"], showing the first 10 (the total is logged at the end)."""
    if on_error == OnError("raise"):
        raise DataError(f"{ex}\n(set data.on_error=skip to skip and count malformed records)") from None
    counts["skipped_malformed"] += 1
    if counts["skipped_malformed"] <= 10:
        log.warning("skipping %s", ex)


def _progress_bar(path: str, enabled: bool, total: Optional[int] = None):
    """Records (preference pairs), or with a `total`: bytes of the source, with an ETA."""
    from tqdm.auto import tqdm

    if total is None:
        return tqdm(desc=f"tokenizing {Path(path).name}", unit=" records", disable=not enabled, mininterval=1.0)
    return tqdm(
        desc=f"tokenizing {Path(path).name}", total=total, unit="B", unit_scale=True, disable=not enabled,
        mininterval=1.0,
    )  # fmt: skip


def _open_rows(work: Path, rows: int, seq_len: int):
    from numpy.lib.format import open_memmap

    pos_dtype = np.uint16 if seq_len <= np.iinfo(np.uint16).max else np.int32
    return (
        open_memmap(work / "input_ids.npy", mode="w+", dtype=np.uint32, shape=(rows, seq_len)),
        open_memmap(work / "supervised.npy", mode="w+", dtype=np.bool_, shape=(rows, seq_len)),
        open_memmap(work / "position_ids.npy", mode="w+", dtype=pos_dtype, shape=(rows, seq_len)),
    )


def _write_packed(work: Path, tokens, mask, lengths: np.ndarray, options: PrepareOptions, pad_id: int) -> int:
    """SFT / instruct: whole samples into rows (best-fit-decreasing, or one per row without packing).
    Each sample's positions restart at 0 and its first label is masked (see packing.py)."""
    seq_len = options.seq_len
    if options.packing:
        bins = best_fit_decreasing(lengths.tolist(), seq_len)
    else:
        bins = [[i] for i in range(len(lengths))]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids_out, sup_out, pos_out = _open_rows(work, len(bins), seq_len)
    filled = np.zeros(len(bins), dtype=np.int64)
    ids_out[:] = pad_id
    for r, members in enumerate(bins):
        at = 0
        for i in members:
            a, n = int(offsets[i]), int(lengths[i])
            ids_out[r, at : at + n] = tokens[a : a + n]
            sup_out[r, at : at + n] = mask[a : a + n]
            sup_out[r, at] = False
            pos_out[r, at : at + n] = np.arange(n)
            at += n
        pos_out[r, at:] = np.arange(seq_len - at)  # padding is a document of its own
        filled[r] = at
    for arr in (ids_out, sup_out, pos_out):
        arr.flush()
    np.save(work / "filled.npy", filled)
    return len(bins)


def _write_chunked(work: Path, tokens, mask, lengths: np.ndarray, seq_len: int, pad_id: int) -> int:
    """Pretraining: documents back to back, cut into rows of seq_len. A document crossing a row
    boundary continues at position 0 of the next row. Positions restart at every document start
    and every row start:

        documents [a a a a a][b b][c c c], seq_len 4
        rows      [a a a a] [a b b c] [c c pad pad]
        positions [0 1 2 3] [0 0 1 0] [0 1 0 1]
        labels    [- a a a] [- - b -] [- c - -]     (- = -100: nothing is predicted across a boundary;
                                                     a row's first label is never used by the loss anyway)
    """
    total = int(lengths.sum())
    rows = -(-total // seq_len)
    ids_out, sup_out, pos_out = _open_rows(work, rows, seq_len)
    doc_offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    block = max(1, (1 << 22) // seq_len)  # rows per block: bounded memory for any corpus size
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        a, b = r0 * seq_len, min(total, r1 * seq_len)
        n = b - a
        flat_ids = np.full((r1 - r0) * seq_len, pad_id, dtype=np.uint32)
        flat_sup = np.zeros((r1 - r0) * seq_len, dtype=bool)
        starts = np.zeros((r1 - r0) * seq_len, dtype=bool)
        flat_ids[:n] = tokens[a:b]
        lo, hi = np.searchsorted(doc_offsets, [a, b])
        starts[doc_offsets[lo:hi] - a] = True
        if n < len(starts):
            starts[n] = True  # the padding tail is a segment of its own
        starts[::seq_len] = True
        flat_sup[:n] = mask[a:b].astype(bool) & ~starts[:n]
        # A True starts a segment. For starts [T F F T F], np.maximum.accumulate over
        # where(starts, index, 0) is [0 0 0 3 3], and index minus that is [0 1 2 0 1].
        index = np.arange(len(starts))
        pos = index - np.maximum.accumulate(np.where(starts, index, 0))
        ids_out[r0:r1] = flat_ids.reshape(-1, seq_len)
        sup_out[r0:r1] = flat_sup.reshape(-1, seq_len)
        pos_out[r0:r1] = pos.reshape(-1, seq_len)
    for arr in (ids_out, sup_out, pos_out):
        arr.flush()
    filled = np.full(rows, seq_len, dtype=np.int64)
    filled[-1] = total - (rows - 1) * seq_len
    np.save(work / "filled.npy", filled)
    return rows
