"""Reshard benchmark: how long resuming a checkpoint on another number of ranks takes, and how it
grows with the parameter count.

For each model size (the memory benchmark's ~100M-parameter Llama widths, bench/memory.py MEM_ARCH,
with --layers decoder layers; a short row so the steps themselves are cheap), three runs of the real
trainer share one output_dir:

    A  2 ranks (deepspeed launcher): 1 step, checkpoint step 1
    B  1 rank  (python): resumes step 1 -> resharded 2 -> 1 (conversion + load), 1 step, checkpoint step 2
    C  2 ranks: resumes step 2 -> resharded 1 -> 2, 1 step

Reported per size and direction, from the trainer's own log lines (`reshard: converted ... in T s`
and `reshard: step_X from W to W' ranks in T s (conversion C s, loading L s)`): the conversion to
DeepSpeed's universal format (once per checkpoint, split over the W' new ranks), the load (every
rank, its own slice),
the checkpoint's size and the conversion's, and seconds per 100M parameters.

    python bench/reshard.py                 # 3, 12 and 24 layers (~30M, ~100M, ~190M parameters)
    python bench/reshard.py --layers 12     # the ~100M memory-benchmark model only
    python bench/reshard.py --smoke         # the tiny model (CI: the script runs; no claims)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import fmt  # noqa: E402
from memory import MEM_ARCH  # noqa: E402

CONVERTED = re.compile(r"reshard: converted (step_\d+) in ([\d.]+) s \(([\d.]+) GB\)")
RESHARDED = re.compile(
    r"reshard: (step_\d+) from (\d+) to (\d+) ranks in ([\d.]+) s "
    r"\(conversion ([\d.]+) s, loading ([\d.]+) s\)"
)


def overrides(arch: Dict, seq_len: int, steps: int, out: Path, cache: Path) -> List[str]:
    return [
        "model=tiny",
        *[f"model.arch.{k}={v}" for k, v in arch.items()],
        "stage=pretrain",
        f"data.seq_len={seq_len}",
        f"data.cache_dir={cache}",
        "logger=jsonl",
        "logger.dashboard=false",
        "trainer.micro_batch_size=1",
        f"trainer.max_steps={steps}",
        "trainer.cadence.save_every_steps=0",
        "trainer.cadence.eval_every_steps=0",
        "trainer.export_hf=false",
        "eval.at_start=false",
        "trainer.schedule.warmup_steps=1",
        "trainer.cadence.log_every_steps=1",
        f"output_dir={out}",
    ]


def size_gb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9


def one_size(arch: Dict, args, base: Path, params: int, layers: int) -> List[Dict]:
    out, cache = base / "run", base / "cache"
    rows = []
    for name, ranks, steps in (("A", 2, 1), ("B", 1, 2), ("C", 2, 3)):
        cmd = harness.launch_cmd("deepspeed" if ranks > 1 else "python", ranks) + overrides(
            arch, args.seq_len, steps, out, cache
        )
        log = base / f"{name}.log"
        load = harness.load_average()
        wall = harness.run_logged(cmd, log)
        if name == "A":
            continue
        text = log.read_text()
        resharded, converted = RESHARDED.search(text), CONVERTED.search(text)
        if not resharded or not converted:
            raise SystemExit(f"{log}: no reshard lines (was the checkpoint resharded?)")
        tag = resharded.group(1)
        rows.append(
            {
                "params": params,
                "layers": layers,
                "from": int(resharded.group(2)),
                "to": int(resharded.group(3)),
                "total_s": float(resharded.group(4)),
                "conversion_s": float(resharded.group(5)),
                "loading_s": float(resharded.group(6)),
                "checkpoint_gb": size_gb(out / "checkpoints" / tag),
                "converted_gb": float(converted.group(3)),
                "run_wall_s": round(wall, 1),
                "load_avg_before": load,
            }
        )
        r = rows[-1]
        print(
            f"  {params / 1e6:.0f}M, {r['from']} -> {r['to']} ranks: conversion {r['conversion_s']:.1f} s, loading "
            f"{r['loading_s']:.1f} s, total {r['total_s']:.1f} s; checkpoint {r['checkpoint_gb']:.2f} GB, converted "
            f"{r['converted_gb']:.2f} GB (load {load[0]})",
            flush=True,
        )
    if not args.keep:  # checkpoints and conversions: ~5 GB at 200M parameters
        shutil.rmtree(out, ignore_errors=True)
    return rows


def table(rows: List[Dict]) -> str:
    lines = [
        "| parameters | ranks | checkpoint | conversion (the new ranks) | load (each rank) | reshard in all | per "
        "100M parameters |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['params'] / 1e6:.0f}M ({r['layers']} layers) | {r['from']} -> {r['to']} | "
            f"{r['checkpoint_gb']:.2f} GB | {r['conversion_s']:.1f} s | {r['loading_s']:.1f} s | "
            f"{r['total_s']:.1f} s | {fmt(r['total_s'] / (r['params'] / 1e8), '.1f')} s |"
        )
    return "\n".join(lines)


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 12, 24], help="decoder layers of each size")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--smoke", action="store_true", help="the tiny model, one size (CI)")
    parser.add_argument("--out", help="work directory (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep each size's output_dir (checkpoints and conversions)")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="fullft-reshard-")).resolve()
    stamp = harness.stamp()
    started = time.perf_counter()
    tokenizer = harness.tiny_tokenizer()
    sizes = [{}] if args.smoke else [{**MEM_ARCH, "num_hidden_layers": n} for n in args.layers]
    print(f"reshard benchmark in {out}; load average {stamp['load_avg_start']}", flush=True)
    rows = []
    for arch in sizes:
        full = {**harness.tiny_arch(), **arch}
        params = harness.param_count(full, len(tokenizer))
        base = out / f"{params // 10**6}M"
        shutil.rmtree(base, ignore_errors=True)
        rows += one_size(arch, args, base, params, full["num_hidden_layers"])
    print()
    print(table(rows))
    report = {
        **stamp,
        "load_avg_end": harness.load_average(),
        "seq_len": args.seq_len,
        "rows": rows,
        "table": table(rows),
        "total_wall_s": round(time.perf_counter() - started, 1),
        "out": str(out),
    }
    for path in [out / "reshard.json"] + ([Path(args.json)] if args.json else []):
        path.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out / 'reshard.json'} ({report['total_wall_s']:.0f} s in all)")
    return report


if __name__ == "__main__":
    main()
