"""Packing benchmark: our best-fit-decreasing against the usual alternatives, side by side.

On a seeded long-tailed length distribution like real SFT sets (lognormal, median ~250 tokens,
tail past 4k), at seq_len 2048 and 4096, in one run:

  ours       data_pipeline.packing.best_fit_decreasing (longest first, into the fullest row that fits)
  first-fit  greedy, input order: each sample into the first row that still has room
  next-fit   greedy, streaming: append to the current row, start a new one when the sample does not fit
  padding    one sample per row, padded to seq_len (no packing)
  trl        TRL's pack_dataset(strategy="bfd") as SFTTrainer calls it (datasets.map, batches of
             1000 samples: each batch is packed on its own), and once more over the whole set in
             a single batch (map_kwargs={"batch_size": None})

For each: packing efficiency (real tokens / row slots), wall time of the packing call, rows, and
optimizer steps per epoch at --batch-rows rows per step, with ratios against ours.

Over-length samples: ours raises on a sample longer than seq_len (the pipeline truncates, drops or
splits it before packing, as configured); TRL's "bfd" truncates to seq_len itself; first-fit,
next-fit and padding have no rule of their own. To compare like with like, every sample is truncated
to seq_len once, before any method runs, and every method gets the same lengths.

    python bench/packing.py                     # 1M samples (needs trl: pip install -e .[bench])
    python bench/packing.py --smoke             # tiny, seconds; skips TRL when it is not installed
    python bench/packing.py --json out.json     # also write the results
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
from typing import Callable, Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data_pipeline.packing import best_fit_decreasing  # noqa: E402

SEQ_LENS = (2048, 4096)
TRL_HINT = "pip install -e .[bench]"


def sft_lengths(n: int, seed: int, median: float = 250.0, sigma: float = 1.0) -> np.ndarray:
    """Token counts of n samples: lognormal with the given median; sigma=1 puts ~0.3% of samples past
    4k tokens and the longest of 1M near 30k, like the tail of real chat/SFT sets."""
    rng = np.random.default_rng(seed)
    return np.maximum(np.rint(rng.lognormal(math.log(median), sigma, n)), 1).astype(np.int64)


# ---- baselines (row id per sample) ----------------------------------------------------------------


def first_fit(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Row id of each sample, first-fit in input order. A max-segment-tree over as many rows as there
    are samples, all starting empty (room = capacity): rows are opened left to right, so the leftmost
    leaf with room >= n is the first open row that fits, or else the next unopened one."""
    size = 1 << max(len(lengths) - 1, 0).bit_length()
    tree = [capacity] * (2 * size)  # tree[i] = most room in the subtree of i; leaves at size..2*size-1
    row = [0] * len(lengths)
    for k, n in enumerate(lengths.tolist()):
        i = 1
        while i < size:
            i <<= 1
            if tree[i] < n:
                i += 1
        row[k] = i - size
        tree[i] -= n
        while i > 1:
            i >>= 1
            most = tree[2 * i] if tree[2 * i] >= tree[2 * i + 1] else tree[2 * i + 1]
            if tree[i] == most:
                break
            tree[i] = most
    return np.asarray(row, dtype=np.int64)


def next_fit(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Row id of each sample: fill the current row in input order, open a new one when it is full."""
    row = [0] * len(lengths)
    r, room = 0, capacity
    for k, n in enumerate(lengths.tolist()):
        if n > room:
            r, room = r + 1, capacity
        room -= n
        row[k] = r
    return np.asarray(row, dtype=np.int64)


def rows_from_bins(bins: List[List[int]], n: int) -> np.ndarray:
    row = np.empty(n, dtype=np.int64)
    row[np.concatenate([np.asarray(b, dtype=np.int64) for b in bins])] = np.repeat(
        np.arange(len(bins)), [len(b) for b in bins]
    )
    return row


def check_rows(row: np.ndarray, lengths: np.ndarray, capacity: int, every_index_once: bool) -> int:
    """Number of rows; asserts no row is over capacity (and, for bins, that every index is placed once)."""
    fill = np.bincount(row, weights=lengths, minlength=int(row.max()) + 1)
    assert fill.max() <= capacity, f"a row holds {fill.max()} tokens > {capacity}"
    assert (fill > 0).all(), "an empty row"
    if every_index_once:
        assert (row >= 0).all()
    return len(fill)


# ---- TRL ------------------------------------------------------------------------------------------


def import_trl(required: bool):
    try:
        import datasets
        import transformers
        import trl
        from trl import pack_dataset
    except ImportError as e:
        if required:
            sys.exit(
                f"error: the full benchmark compares against TRL, which is not importable ({e}).\n"
                f"Install the bench extra: {TRL_HINT}   (or run with --smoke to skip TRL)"
            )
        print(f"note: trl is not importable ({e}); skipping the TRL rows. {TRL_HINT} to include them.")
        return None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return {
        "pack_dataset": pack_dataset,
        "datasets": datasets,
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "datasets": datasets.__version__,
        },
    }


def trl_dataset(trl_mod, lengths: np.ndarray):
    """An in-memory datasets.Dataset with one int32 `input_ids` list column of the given lengths (the
    token values do not matter to packing; int32 because real vocabularies need it)."""
    import pyarrow as pa

    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = pa.array(np.zeros(int(offsets[-1]), dtype=np.int32))
    offsets_type = np.int32 if offsets[-1] < 2**31 else np.int64
    cls = pa.ListArray if offsets_type is np.int32 else pa.LargeListArray
    column = cls.from_arrays(pa.array(offsets.astype(offsets_type)), values)
    return trl_mod["datasets"].Dataset(pa.table({"input_ids": column}))


def trl_rows(packed, lengths: np.ndarray, capacity: int) -> int:
    """Rows of a TRL-packed dataset, after checking its per-row document lengths."""
    seq = packed.data.column("seq_lengths").combine_chunks()
    row_len = np.add.reduceat(seq.values.to_numpy(zero_copy_only=False), seq.offsets.to_numpy()[:-1])
    assert row_len.max() <= capacity
    assert row_len.sum() == lengths.sum(), "TRL lost or duplicated tokens"
    assert len(seq.values) == len(lengths), "TRL lost or duplicated samples"
    return len(seq)


# ---- the run --------------------------------------------------------------------------------------


def timed(fn: Callable):
    gc.collect()
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def run(n: int, seed: int, batch_rows: int, trl_mod: Optional[dict]) -> List[Dict]:
    raw = sft_lengths(n, seed)
    print(
        f"{n:,} samples, lognormal lengths seed {seed}: median {int(np.median(raw))}, mean {raw.mean():.0f}, "
        f"p99 {int(np.percentile(raw, 99))}, max {raw.max():,}; {int((raw > 4096).sum()):,} past 4096 tokens"
    )
    results = []
    for seq_len in SEQ_LENS:
        lengths = np.minimum(raw, seq_len)  # the one truncation every method shares (see module doc)
        tokens = int(lengths.sum())
        over = int((raw > seq_len).sum())
        methods = {}

        # (each lambda is called at once, inside this iteration: B023's late binding cannot bite)
        bins, t = timed(lambda: best_fit_decreasing(lengths, seq_len))  # noqa: B023
        methods["ours: best-fit-decreasing"] = (check_rows(rows_from_bins(bins, n), lengths, seq_len, True), t)
        del bins
        row, t = timed(lambda: first_fit(lengths, seq_len))  # noqa: B023
        methods["greedy first-fit (input order)"] = (check_rows(row, lengths, seq_len, True), t)
        row, t = timed(lambda: next_fit(lengths, seq_len))  # noqa: B023
        methods["greedy next-fit (streaming)"] = (check_rows(row, lengths, seq_len, True), t)
        methods["naive padding (1 sample/row)"] = (n, 0.0)
        if trl_mod is not None:
            for name, kwargs in (
                ("trl pack_dataset bfd (SFTTrainer: map batches of 1000)", {}),
                ("trl pack_dataset bfd (one batch: batch_size=None)", {"batch_size": None}),
            ):
                ds = trl_dataset(trl_mod, lengths)
                packed, t = timed(lambda: trl_mod["pack_dataset"](ds, seq_len, strategy="bfd", map_kwargs=kwargs))  # noqa: B023
                methods[name] = (trl_rows(packed, lengths, seq_len), t)
                del ds, packed

        ours_rows, ours_t = methods["ours: best-fit-decreasing"]
        print(
            f"\nseq_len {seq_len}: {tokens:,} tokens after truncating {over:,} samples to {seq_len} "
            f"({int(raw.sum()) - tokens:,} tokens cut); steps/epoch at {batch_rows} rows per step"
        )
        header = (
            f"{'method':<56} {'efficiency':>10} {'rows':>10} {'steps/epoch':>11} {'time s':>8} "
            f"{'rows/ours':>9} {'time/ours':>9}"
        )
        print(header)
        print("-" * len(header))
        for name, (rows, t) in methods.items():
            eff = tokens / (rows * seq_len)
            steps = math.ceil(rows / batch_rows)
            secs, time_ratio = (f"{t:.3f}", f"{t / ours_t:.2f}x") if t else ("-", "-")  # padding: no work
            print(
                f"{name:<56} {eff:>10.3%} {rows:>10,} {steps:>11,} {secs:>8} {rows / ours_rows:>8.3f}x {time_ratio:>9}"
            )
            results.append(
                {
                    "seq_len": seq_len,
                    "method": name,
                    "samples": n,
                    "tokens": tokens,
                    "samples_truncated": over,
                    "efficiency": eff,
                    "rows": rows,
                    "steps_per_epoch": steps,
                    "batch_rows": batch_rows,
                    "seconds": t,
                    "rows_vs_ours": rows / ours_rows,
                    "time_vs_ours": t / ours_t if t else None,
                }
            )
        sys.stdout.flush()
    return results


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=1_000_000, help="number of samples (default 1,000,000)")
    p.add_argument("--smoke", action="store_true", help="2,000 samples, seconds; TRL optional (CI)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-rows", type=int, default=32, help="rows per optimizer step, for steps/epoch")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    args = p.parse_args(argv)
    n = 2_000 if args.smoke else args.samples

    trl_mod = import_trl(required=not args.smoke)
    versions = {"python": platform.python_version(), "numpy": np.__version__, **(trl_mod or {}).get("versions", {})}
    print("packing benchmark · " + " · ".join(f"{k} {v}" for k, v in versions.items()))
    results = run(n, args.seed, args.batch_rows, trl_mod)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "argv": sys.argv,
                    "samples": n,
                    "seed": args.seed,
                    "versions": versions,
                    "cpus": os.cpu_count(),
                    "results": results,
                },
                f,
                indent=1,
            )
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
