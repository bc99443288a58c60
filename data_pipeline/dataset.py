"""Build packed rows from a source: read -> normalise -> tokenize -> pack.

Pretraining concatenates documents and chunks them; SFT and instruction tuning pack whole samples
with best-fit-decreasing. Skipped records (data.on_error=skip), truncated, dropped and fully masked
samples are counted in `stats`, never lost silently.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np

from data_pipeline.formats import normalise
from data_pipeline.packing import IGNORE, best_fit_decreasing, chunk_documents, pack_rows
from data_pipeline.sources import DataError, read_records
from data_pipeline.tokenization import check_chat_template, encode

log = logging.getLogger("data_pipeline")


@dataclass
class PackedData:
    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    filled: np.ndarray
    """Real (non-padding) tokens per row."""
    stats: Dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)


def build_packed(path: str, fmt: str, stage: str, tokenizer, seq_len: int, on_error: str = "raise",
                 overlong: str = "truncate") -> PackedData:
    counts: Counter = Counter()
    samples: List[Tuple[List[int], List[int]]] = []
    chat_checked = False
    for record in read_records(path):
        counts["records"] += 1
        try:
            example = normalise(record, fmt)
            if example.messages is not None and not chat_checked:
                check_chat_template(tokenizer, record.where)
                chat_checked = True
            ids, labels = encode(tokenizer, example, stage)
        except DataError as ex:
            if on_error == "raise":
                raise DataError(f"{ex}\n(set data.on_error=skip to skip and count malformed records)") from None
            counts["skipped_malformed"] += 1
            log.warning("skipping %s", ex)
            continue
        if len(ids) > seq_len and stage != "pretrain":
            if overlong == "drop":
                counts["dropped_overlong"] += 1
                continue
            ids, labels = ids[:seq_len], labels[:seq_len]
            counts["truncated_overlong"] += 1
        if all(t == IGNORE for t in labels[1:]):
            counts["dropped_no_supervised_tokens"] += 1
            continue
        samples.append((ids, labels))
    if not samples:
        raise DataError(f"{path}: no usable samples out of {counts['records']} records ({dict(counts)})")

    pad_id = tokenizer.pad_token_id
    if stage == "pretrain":
        rows = chunk_documents(samples, seq_len)
        pieces = [piece for row in rows for piece in row]
        bins, at = [], 0
        for row in rows:
            bins.append(list(range(at, at + len(row))))
            at += len(row)
        input_ids, labels, position_ids, filled = pack_rows(pieces, bins, seq_len, pad_id)
    else:
        bins = best_fit_decreasing([len(ids) for ids, _ in samples], seq_len)
        input_ids, labels, position_ids, filled = pack_rows(samples, bins, seq_len, pad_id)
    real = sum(len(ids) for ids, _ in samples)
    stats = dict(counts, samples=len(samples), rows=len(input_ids), real_tokens=real,
                 supervised_tokens=int((labels != IGNORE).sum()),
                 packing_efficiency=real / input_ids.size)
    log.info("%s: %d samples -> %d rows of %d tokens, packing efficiency %.3f, counts %s", path, len(samples),
             len(input_ids), seq_len, stats["packing_efficiency"], dict(counts))
    return PackedData(input_ids, labels, position_ids, filled, stats)
