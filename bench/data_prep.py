"""Data-preparation benchmark: how fast `data_pipeline.prepare.prepare` tokenizes and packs, and
whether its memory stays flat as the corpus grows (it streams: tokenized samples go to flat files on
disk, and only the sample lengths stay in memory).

For each corpus size (seeded synthetic alpaca records with lognormal answer lengths, median 250
tokens: bench/harness.py), a fresh process prepares the corpus into an empty cache with the tiny
model's tokenizer and chat template (stage=sft, packed rows of --seq-len), and reports:

  time        wall time of prepare(), split into tokenizing (cut into units, read, normalise, chat
              template, tokenize, label mask, append to each unit's files; the worker pool's start
              included) and merging the units + packing + writing the rows
  tokens/s    real tokens (and records) per second of the whole prepare()
  memory      sampled from /proc/self/status every 20 ms during prepare(), relative to the
              process just before it (tokenizer loaded): anonymous memory (RssAnon: what the process
              really holds) and file-backed pages (RssFile: pages of the memory-mapped output and
              scratch files, clean or written back, that the kernel can drop); and the peak RSS
              (ru_maxrss, both together)

With --workers 1,2 (the default) each size is prepared once per worker count (data.prepare_workers),
each in a fresh process, side by side: tokens/s, the scaling efficiency (tokens/s with N workers over
N x tokens/s with one), each worker's peak RSS (the pool's processes, sampled from /proc/<pid>/status
like the parent's) and a hash of the prepared arrays, which must be the same for every count.

Flat memory means RssAnon grows with the corpus only by the per-sample bookkeeping (the lengths
list while tokenizing, the packing's bins): ~100 bytes a sample, not by the token count.

    python bench/data_prep.py                         # 50,000 and 200,000 records (~5 minutes on 2 cores)
    python bench/data_prep.py --sizes 10000,40000     # other sizes
    python bench/data_prep.py --smoke                 # 1,000 and 4,000 records (seconds; CI)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import ROOT  # noqa: E402


def _status_kib(path: str = "/proc/self/status") -> Dict[str, int]:
    out = {}
    with open(path) as f:
        for line in f:
            if line.startswith(("VmRSS:", "RssAnon:", "RssFile:", "RssShmem:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    return out


def _children_rss_kib() -> Dict[int, int]:
    """VmRSS of each live child process (the preparation's worker pool)."""
    import multiprocessing

    out = {}
    for c in multiprocessing.active_children():
        try:
            out[c.pid] = _status_kib(f"/proc/{c.pid}/status").get("VmRSS", 0)
        except OSError:  # exited between the listing and the read
            pass
    return out


class MemorySampler:
    """Peak of each /proc/self/status field, and of each child's VmRSS, sampled every `interval`
    seconds in a thread."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.peak = interval, _status_kib()
        self.children: Dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for k, v in _status_kib().items():
                self.peak[k] = max(self.peak.get(k, 0), v)
            for pid, v in _children_rss_kib().items():
                self.children[pid] = max(self.children.get(pid, 0), v)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for k, v in _status_kib().items():
            self.peak[k] = max(self.peak.get(k, 0), v)


def child(args) -> None:
    """Prepare one corpus in this (fresh) process and write the measurements as JSON."""
    import data_pipeline.prepare as prep

    tokenizer = harness.tiny_tokenizer()
    phases = {"tokenize_s": 0.0}

    def timed(fn, key):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[key] = phases.get(key, 0.0) + time.perf_counter() - start

        return wrapper

    prep.tokenize_units = timed(prep.tokenize_units, "tokenize_s")
    if args.force_pool:  # the smoke's corpora are below the size at which a pool starts, and one unit each
        prep.POOL_MIN_BYTES = 0
        prep.unit_bytes_for = lambda total: max(total // 16, 1)
    options = (
        prep.PrepareOptions(objective="pretrain", seq_len=args.seq_len)  # --text: a real corpus, every token
        if args.pretrain
        else prep.PrepareOptions(objective="sft", seq_len=args.seq_len, fmt="alpaca")
    )
    before = _status_kib()
    start = time.perf_counter()
    with MemorySampler() as mem:
        prepared = prep.prepare(args.path, tokenizer, options, args.cache, workers=args.workers)
    seconds = time.perf_counter() - start
    stats = prepared.stats
    digest = hashlib.sha256()
    for name in ("input_ids.npy", "supervised.npy", "position_ids.npy", "filled.npy"):
        digest.update((prepared.directory / name).read_bytes())
    result = {
        "workers": args.workers,
        "arrays_sha256": digest.hexdigest(),
        "worker_peak_rss_mib": max(mem.children.values(), default=0) / 1024,
        "records": stats["records"],
        "samples": stats["samples"],
        "rows": stats["rows"],
        "real_tokens": stats["real_tokens"],
        "supervised_tokens": stats["supervised_tokens"],
        "packing_efficiency": stats["packing_efficiency"],
        "truncated": stats.get("truncated_overlong", 0),
        "seconds": seconds,
        "tokenize_s": phases["tokenize_s"],
        "pack_write_s": seconds - phases["tokenize_s"],
        "tokens_per_s": stats["real_tokens"] / seconds,
        "records_per_s": stats["records"] / seconds,
        "tokenize_tokens_per_s": stats["real_tokens"] / phases["tokenize_s"],
        "mib_before": {k: v / 1024 for k, v in before.items()},
        "mib_peak": {k: v / 1024 for k, v in mem.peak.items()},
        "anon_growth_mib": (mem.peak["RssAnon"] - before["RssAnon"]) / 1024,
        "file_growth_mib": (mem.peak["RssFile"] - before["RssFile"]) / 1024,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "output_mib": sum(p.stat().st_size for p in prepared.directory.iterdir()) / 2**20,
        "input_mib": Path(args.path).stat().st_size / 2**20,
    }
    Path(args.result).write_text(json.dumps(result, indent=1))


def table(results: List[Dict]) -> str:
    lines = [
        "| records | workers | tokens | rows (efficiency) | prepare (s) | tokenize / merge+pack+write (s) | tokens/s "
        "| scaling | RssAnon growth (MiB) | RssFile growth (MiB) | peak RSS (MiB) | a worker's peak RSS (MiB) "
        "| output (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        worker = f"{r['worker_peak_rss_mib']:.0f}" if r["worker_peak_rss_mib"] else "(in process)"
        lines.append(
            f"| {r['records']:,} | {r['workers']} | {r['real_tokens']:,} | {r['rows']:,} "
            f"({100 * r['packing_efficiency']:.2f}%) | {r['seconds']:.1f} | {r['tokenize_s']:.1f} / "
            f"{r['pack_write_s']:.1f} | {r['tokens_per_s']:,.0f} | {r.get('scaling', 1.0):.2f} "
            f"| {r['anon_growth_mib']:.1f} | {r['file_growth_mib']:.1f} | {r['ru_maxrss_mib']:.0f} | {worker} "
            f"| {r['output_mib']:.0f} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--sizes", default="50000,200000", help="corpus sizes in records, comma-separated")
    p.add_argument("--workers", default="1,2", help="worker counts (data.prepare_workers), comma-separated")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--smoke", action="store_true", help="1,000 and 4,000 records (CI; no claims)")
    p.add_argument("--out", help="work directory (default: a new temporary directory, removed unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the corpora and prepared rows")
    p.add_argument("--json", help="also write the report here")
    # internal: one measurement in a fresh process
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--force-pool", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pretrain", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--text", help="a real text corpus (documents separated by blank lines, e.g. bench/corpora.py's gcide.txt) "
        "prepared for continued pretraining instead of the synthetic sizes",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.child:
        args.workers = int(args.workers)
        return args
    args.workers = [int(w) for w in args.workers.split(",")]
    args.sizes = [1000, 4000] if args.smoke else [int(s) for s in args.sizes.split(",")]
    return args


def main(argv=None) -> Dict:
    args = parse_args(argv)
    if args.child:
        child(args)
        return {}
    out = Path(args.out or tempfile.mkdtemp(prefix="fullft-dataprep-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stamp = harness.stamp()
    pool = None if args.text else harness.SentencePool(harness.tiny_tokenizer())
    print(
        f"data preparation: sizes {args.sizes}, seq_len {args.seq_len}, in {out}; load average "
        f"{stamp['load_avg_start']}",
        flush=True,
    )
    results = []
    for n in [0] if args.text else args.sizes:
        corpus = Path(args.text).resolve() if args.text else out / f"alpaca_{n}.jsonl"
        if not args.text:
            harness.write_alpaca(corpus, pool, n, args.seed)
        one = None
        for w in args.workers:
            cache = out / f"cache_{n}_w{w}"
            shutil.rmtree(cache, ignore_errors=True)
            result_file = out / f"result_{n}_w{w}.json"
            load = harness.load_average()
            cmd = [sys.executable, __file__, "--child", "--path", str(corpus), "--cache", str(cache)]
            cmd += ["--result", str(result_file), "--seq-len", str(args.seq_len), "--workers", str(w)]
            cmd += (["--force-pool"] if args.smoke else []) + (["--pretrain"] if args.text else [])
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"preparing {corpus} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            r = {**json.loads(result_file.read_text()), "load_avg_before": load}
            one = one or r
            r["scaling"] = r["tokens_per_s"] / (r["workers"] * one["tokens_per_s"])
            if r["arrays_sha256"] != one["arrays_sha256"]:
                raise SystemExit(
                    f"{n:,} records: the arrays prepared by {w} workers differ from {one['workers']} worker's "
                    f"({r['arrays_sha256'][:12]} vs {one['arrays_sha256'][:12]}): the output must not depend on "
                    "the split"
                )
            results.append(r)
            print(
                f"  {r['records']:,} records, {w} worker(s): {r['seconds']:.1f} s, {r['tokens_per_s']:,.0f} tokens/s "
                f"(scaling {r['scaling']:.2f}), RssAnon +{r['anon_growth_mib']:.1f} MiB, RssFile "
                f"+{r['file_growth_mib']:.1f} MiB, peak RSS {r['ru_maxrss_mib']:.0f} MiB, a worker's peak RSS "
                f"{r['worker_peak_rss_mib']:.0f} MiB, arrays {r['arrays_sha256'][:12]} (load {load[0]})",
                flush=True,
            )
            if not args.keep:
                shutil.rmtree(cache, ignore_errors=True)
        if not args.keep and not args.text:
            corpus.unlink()
    summary = {}
    single = [r for r in results if r["workers"] == args.workers[0]]
    if len(single) >= 2:
        small, big = single[0], single[-1]
        extra = big["samples"] - small["samples"]
        summary = {
            "anon_growth_small_mib": small["anon_growth_mib"],
            "anon_growth_big_mib": big["anon_growth_mib"],
            "anon_bytes_per_extra_sample": (big["anon_growth_mib"] - small["anon_growth_mib"]) * 2**20 / extra,
            "token_ratio": big["real_tokens"] / small["real_tokens"],
            "file_growth_ratio": big["file_growth_mib"] / max(small["file_growth_mib"], 1e-9),
            "tokens_per_s_ratio": big["tokens_per_s"] / small["tokens_per_s"],
        }
    print()
    what = (
        f"{args.text} (stage pretrain, documents chunked into rows of {args.seq_len})"
        if args.text
        else f"synthetic alpaca (answers lognormal, median 250 tokens), stage sft, packed rows of {args.seq_len}"
    )
    print(f"Data preparation: {what}, tiny tokenizer, one fresh process per size and worker count")
    print(table(results))
    if summary:
        print(
            f"{single[-1]['records']:,} vs {single[0]['records']:,} records ({summary['token_ratio']:.1f}x the "
            "tokens): "
            f"anonymous memory +{summary['anon_growth_small_mib']:.1f} -> +{summary['anon_growth_big_mib']:.1f} MiB "
            f"({summary['anon_bytes_per_extra_sample']:.0f} bytes per extra sample); file-backed pages "
            f"{summary['file_growth_ratio']:.1f}x; tokens/s x{summary['tokens_per_s_ratio']:.2f}"
        )
    report = {
        **stamp,
        "load_avg_end": harness.load_average(),
        "seq_len": args.seq_len,
        "results": results,
        "summary": summary,
        "table": table(results),
    }
    for path in ([out / "data_prep.json"] if args.keep else []) + ([Path(args.json)] if args.json else []):
        path.write_text(json.dumps(report, indent=1, default=str))
    if not args.keep and not args.out:
        shutil.rmtree(out, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()
