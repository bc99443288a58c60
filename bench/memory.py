"""Memory benchmark: per-rank peak memory of our trainer as ZeRO-3 world size, activation
checkpointing and EWC change, with the step-time cost of each, side by side in one run.

Every run is the real trainer (`deepspeed --num_gpus N launch/train.py` + overrides) on a random-init
Llama big enough that model states dominate a CPU process's memory (~100M parameters: 20 bytes a
parameter of ZeRO-3 model state in fp32 — parameter partition, fp32 master partition, gradient
partition, Adam's two moments — is ~2 GB on one rank), packed SFT rows from the seeded synthetic
alpaca set (bench/harness.py). Numbers come from the trainer's own metrics.jsonl: per-rank peak
memory `perf/rank<R>/peak_mem_gb` (peak RSS on CPU, max allocated on a GPU; logged before the final
checkpoint is written) and the median `perf/step_time_s` after the first --skip-steps steps.

    world size   1 vs 2 ranks at a short row (--short-seq), where activations are small: ZeRO-3
                 partitions model states, so per-rank model-state memory should halve. The drop
                 of the per-rank peak from 1 to 2 ranks is compared with half of 20 B x parameters.
    activation   none / full / every_n (every 2nd layer) with 2 ranks at a long row (--seq-len):
    checkpointing  peak memory and step time against none
    EWC          regularizer=ewc vs none with 2 ranks at --seq-len: EWC keeps the Fisher and the
                 anchor for the rank's own fp32 partition (8 B x parameters / ranks) and adds
                 λF(θ-θ*) to the local gradient every step; issue 8's target is <= 3% step time. EWC's own
                 time is read as the step time outside the trainer's timed phases (where the loop calls
                 it) minus the same for the reference run: the whole step time also moves with the
                 machine's load

    DPO          stage=dpo vs stage=sft with 2 ranks at --seq-len on the same rows: the SFT run trains on
                 the pairs' documents (prompt + chosen, prompt + rejected, as completions) packed to the
                 same row length, so both steps see the same tokens; issue 14's target is a DPO step
                 within 10% of the SFT step's peak memory (no second model: the reference log-probs
                 are scored once before training by the same engine, trainer/objectives/reference.py)

    freezing     regularizer.freeze.first_blocks=--freeze-blocks vs none with 2 ranks at --short-seq: a
                 frozen parameter has no fp32 master copy, no Adam moments and no gradient partition
                 (16 B a parameter in fp32, over the ranks); the drop of the per-rank peak is compared
                 with that. The untied tiny Llama's embeddings are frozen with the blocks

    chunked CE   trainer.loss_chunk_tokens=0 (full logits) vs null (chunked) on 1 rank of the tiny Llama
                 (hidden 256, 4 layers) with its vocabulary padded to --ce-vocabs and rows of --ce-seqs
                 tokens, where the logits dominate a step; issue 16's target is >= 40% lower peak at
                 vocab 128k, seq 8k, at <= 5% step time

    python bench/memory.py                 # ~100M-parameter Llama, CPU ranks (about 15 minutes on 2 cores)
    python bench/memory.py --smoke         # tiny model, 2 steps: runs 1 and 2 ranks only; the AC and EWC
                                           # runs' configs are composed (checked), not trained (CI; no claims)
    python bench/memory.py --only ws,ewc   # a subset: ws, ac, ewc, dpo, freeze, ce
    python bench/memory.py --dry-run       # every run's config composed, nothing launched (any machine)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import fmt, ratio  # noqa: E402

TARGET_EWC_COST = 0.03
TARGET_DPO_MEM = 1.10  # a DPO step's peak within 10% of an SFT step's on the same rows
TARGET_CE_MEM, TARGET_CE_TIME = 0.60, 1.05  # chunked CE at vocab 128k, seq 8k: >= 40% lower peak, <= 5% time
# ~100M parameters with the tiny 2k-token vocabulary (GPT-2-small-like widths, Llama blocks).
MEM_ARCH = dict(
    hidden_size=768, intermediate_size=2560, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12
)
STATE_BYTES = 20  # ZeRO-3, fp32: parameter 4 + fp32 master 4 + gradient 4 + Adam m, v 8
FROZEN_SAVES = 16  # a frozen parameter keeps its 4 B and drops master, gradient and Adam's two moments
ALL = ("ws", "ac", "ewc", "dpo", "freeze", "ce")


@dataclass
class Run:
    name: str
    group: str
    ranks: int
    seq_len: int
    overrides: List[str] = field(default_factory=list)
    data: str = "train"
    """Which data file: train (alpaca SFT), pairs (preference pairs), pair_docs (their documents as completions)."""


def runs(args) -> List[Run]:
    out = []
    if "ws" in args.only:
        out += [Run("1 rank", "ws", 1, args.short_seq), Run("2 ranks", "ws", 2, args.short_seq)]
    if ("ac" in args.only or "ewc" in args.only) and not (out and args.short_seq == args.seq_len):
        out.append(Run("AC none", "ac", 2, args.seq_len, ["trainer.activation_checkpointing=none"]))
    if "ac" in args.only:
        out += [
            Run("AC full", "ac", 2, args.seq_len, ["trainer.activation_checkpointing=full"]),
            Run(
                "AC every_n (n=2)",
                "ac",
                2,
                args.seq_len,
                ["trainer.activation_checkpointing=every_n", "trainer.activation_checkpointing_every_n=2"],
            ),
        ]
    if "ewc" in args.only:
        out.append(
            Run(
                "EWC",
                "ewc",
                2,
                args.seq_len,
                [
                    "regularizer=ewc",
                    f"regularizer.ewc.fisher_data={args.fisher}",
                    f"regularizer.ewc.fisher_batches={args.fisher_batches}",
                ],
            )
        )
    if "freeze" in args.only:
        if "ws" not in args.only:
            out.append(Run("2 ranks", "ws", 2, args.short_seq))
        out.append(
            Run(
                f"freeze {args.freeze_blocks} blocks",
                "freeze",
                2,
                args.short_seq,
                [f"regularizer.freeze.first_blocks={args.freeze_blocks}"],
            )
        )
    if "dpo" in args.only:
        out += [
            Run("SFT on the pair documents", "dpo", 2, args.seq_len, data="pair_docs"),
            Run("DPO", "dpo", 2, args.seq_len, data="pairs"),
        ]
    if "ce" in args.only:
        for vocab in args.ce_vocabs:
            for seq in args.ce_seqs:
                for chunked in (False, True):
                    out.append(
                        Run(
                            f"CE {'chunked' if chunked else 'full logits'} V={vocab} T={seq}",
                            "ce",
                            1,
                            seq,
                            [
                                f"++model.arch.vocab_size={vocab}",
                                f"model.arch.max_position_embeddings={max(seq, 2048)}",
                                f"trainer.loss_chunk_tokens={'null' if chunked else 0}",
                            ],
                        )
                    )
    return out


def write_pairs(path: Path, docs: Path, train: Path) -> None:
    """Preference pairs from the synthetic alpaca records (prompt: the instruction; chosen: its answer;
    rejected: the next record's answer), and the same documents as completions for the SFT run."""
    records = [json.loads(line) for line in train.read_text().splitlines()]
    with open(path, "w") as pairs, open(docs, "w") as completions:
        for i, r in enumerate(records):
            prompt, chosen, rejected = r["instruction"] + "\n", r["output"], records[(i + 1) % len(records)]["output"]
            pairs.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
            for answer in (chosen, rejected):
                completions.write(json.dumps({"prompt": prompt, "completion": answer}) + "\n")


def overrides(args, run: Run, data: Dict[str, Path], cache: Path, out: Path) -> List[str]:
    arch = [] if run.group == "ce" else [f"model.arch.{k}={v}" for k, v in args.arch.items()]  # ce: the tiny Llama
    stage, fmt = {"train": ("sft", "alpaca"), "pairs": ("dpo", "auto"), "pair_docs": ("sft", "completion")}[run.data]
    return [
        "model=tiny",
        *arch,
        f"stage={stage}",
        f"data.path={data[run.data]}",
        f"data.format={fmt}",
        f"data.seq_len={run.seq_len}",
        f"data.cache_dir={cache}",
        "logger=jsonl",
        f"trainer.micro_batch_size={args.micro_rows}",
        "trainer.grad_accum_steps=1",
        f"trainer.max_steps={args.steps}",
        "trainer.cadence.log_every_steps=1",
        "trainer.cadence.save_every_steps=0",
        "trainer.cadence.eval_every_steps=0",
        "trainer.export_hf=false",
        "eval.at_start=false",
        "trainer.schedule.warmup_steps=1",
        f"trainer.seed={args.seed}",
        *run.overrides,
        f"output_dir={out}",
    ]


def measure(rows: List[Dict], ranks: int, skip: int) -> Dict:
    last = [r for r in rows if "perf/peak_mem_gb" in r][-1]
    per_rank = [last.get(f"perf/rank{r}/peak_mem_gb", last["perf/peak_mem_gb"]) for r in range(ranks)]
    times = harness.series(rows, "perf/step_time_s")
    timed = [times[s] for s in sorted(times) if s > skip] or list(times.values())
    # Time per step outside the timed phases (data wait, forward/backward, optimizer): where EWC adds
    # its gradient term, so its difference to the reference is EWC's own cost, robust to a busy machine.
    unphased = [
        r["perf/step_time_s"] - sum(r.get(f"perf/{p}_s", 0.0) for p in ("data_wait", "forward_backward", "optimizer"))
        for r in rows
        if "perf/step_time_s" in r and r["step"] > skip
    ]
    return {
        "peak_mem_gb_per_rank": per_rank,
        "peak_mem_gb": max(per_rank),
        "step_time_s": statistics.median(timed),
        "unphased_s": statistics.median(unphased) if unphased else None,
        "step_times_s": [times[s] for s in sorted(times)],
        "tokens_per_s": statistics.median(
            r["perf/tokens_per_s"] for r in rows if "perf/tokens_per_s" in r and r["step"] > skip
        )
        if any(r["step"] > skip for r in rows)
        else None,
    }


def reference(by_name: Dict[str, Dict]) -> Optional[Dict]:
    """The AC / EWC reference: `AC none`, or the 2-rank run when --short-seq equals --seq-len."""
    return by_name.get("AC none") or by_name.get("2 ranks")


def frozen_count(arch: Dict, vocab: int, blocks: int) -> int:
    """Parameters regularizer.freeze.first_blocks=`blocks` freezes in the untied Llama `arch`: the blocks and
    the token embeddings."""
    h, inter = arch["hidden_size"], arch["intermediate_size"]
    kv = h * arch["num_key_value_heads"] // arch["num_attention_heads"]
    block = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h  # q, o, k, v, gate/up/down, two norms
    return blocks * block + vocab * h


def summarise(results: List[Dict], params: int, frozen: int = 0) -> Dict:
    """Ratios and differences against the references, from the measured runs (pure arithmetic).

    World size: the per-rank peak drop from 1 to 2 ranks against half of the ZeRO-3 model states,
    e.g. 100M parameters: 20 B x 1e8 / 2 = 0.93 GiB expected to leave each rank.
    EWC: its own time is the step time outside the timed phases beyond the reference's; its memory
    the Fisher and anchor of each rank's partition, 8 B x params / 2 ranks."""
    by_name = {r["name"]: r for r in results}
    none = reference(by_name)
    summary: Dict = {}
    one, two = by_name.get("1 rank"), by_name.get("2 ranks")
    if one and two:
        drop = one["peak_mem_gb"] - two["peak_mem_gb"]
        expected = STATE_BYTES * params / 2 / 2**30  # half of the model states leave each rank
        summary.update(
            ws_peak_ratio=two["peak_mem_gb"] / one["peak_mem_gb"],
            ws_drop_gb=drop,
            ws_expected_drop_gb=expected,
            ws_drop_vs_expected=drop / expected,
        )
    for name in ("AC full", "AC every_n (n=2)", "EWC"):
        r = by_name.get(name)
        if r and none:
            key = name.split(" (")[0].lower().replace(" ", "_")
            summary[f"{key}_mem_ratio"] = r["peak_mem_gb"] / none["peak_mem_gb"]
            summary[f"{key}_mem_delta_gb"] = r["peak_mem_gb"] - none["peak_mem_gb"]
            summary[f"{key}_time_ratio"] = r["step_time_s"] / none["step_time_s"]
    ewc = by_name.get("EWC")
    if ewc and none:
        summary["ewc_expected_extra_gb"] = 8 * params / 2 / 2**30
        summary["ewc_extra_gb"] = ewc["peak_mem_gb"] - none["peak_mem_gb"]
        summary["ewc_own_time_s"] = ewc["unphased_s"] - none["unphased_s"]
        summary["ewc_own_time_share"] = summary["ewc_own_time_s"] / none["step_time_s"]
        summary["ewc_cost_target_met"] = summary["ewc_own_time_share"] <= TARGET_EWC_COST
    fr = next((r for r in results if r["group"] == "freeze"), None)
    if fr and two:
        summary["freeze_mem_ratio"] = fr["peak_mem_gb"] / two["peak_mem_gb"]
        summary["freeze_drop_gb"] = two["peak_mem_gb"] - fr["peak_mem_gb"]
        summary["freeze_expected_drop_gb"] = FROZEN_SAVES * frozen / 2 / 2**30
        summary["freeze_time_ratio"] = fr["step_time_s"] / two["step_time_s"]
        summary["freeze_frozen_params"] = frozen
    sft, dpo = by_name.get("SFT on the pair documents"), by_name.get("DPO")
    if sft and dpo:
        summary["dpo_mem_ratio"] = dpo["peak_mem_gb"] / sft["peak_mem_gb"]
        summary["dpo_time_ratio"] = dpo["step_time_s"] / sft["step_time_s"]
        summary["dpo_mem_target_met"] = summary["dpo_mem_ratio"] <= TARGET_DPO_MEM
    for r in results:
        if r["group"] == "ce" and r["name"].startswith("CE chunked"):
            full = by_name.get(r["name"].replace("CE chunked", "CE full logits"))
            if full:
                key = r["name"].split(" ", 2)[2].replace(" ", "_").replace("=", "")  # V128256_T8192
                summary[f"ce_{key}_mem_ratio"] = r["peak_mem_gb"] / full["peak_mem_gb"]
                summary[f"ce_{key}_time_ratio"] = r["step_time_s"] / full["step_time_s"]
    big = [k for k in summary if k.startswith("ce_V128256_T8192_mem")]
    if big:
        summary["ce_target_met"] = (
            summary["ce_V128256_T8192_mem_ratio"] <= TARGET_CE_MEM
            and summary["ce_V128256_T8192_time_ratio"] <= TARGET_CE_TIME
        )
    return summary


def table(results: List[Dict], ref_of) -> str:
    head = (
        "| run | ranks | seq_len | peak mem per rank (GB) | vs reference | Δ vs reference (GB) | step time (s) "
        "| vs reference | reference |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        ref = ref_of(r)
        mem = " / ".join(f"{m:.3f}" for m in r["peak_mem_gb_per_rank"])
        same = ref is r
        lines.append(
            f"| {r['name']} | {r['ranks']} | {r['seq_len']} | {mem} "
            f"| {'–' if same or not ref else fmt(ratio(r['peak_mem_gb'], ref['peak_mem_gb']), '.2f') + 'x'} "
            f"| {'–' if same or not ref else format(r['peak_mem_gb'] - ref['peak_mem_gb'], '+.3f')} "
            f"| {r['step_time_s']:.3f} "
            f"| {'–' if same or not ref else fmt(ratio(r['step_time_s'], ref['step_time_s']), '.3f') + 'x'} "
            f"| {'–' if same or not ref else ref['name']} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--only", default=",".join(ALL), help=f"comma-separated subset of {', '.join(ALL)}")
    p.add_argument("--freeze-blocks", type=int, default=6, help="blocks the freezing run freezes (of 12)")
    p.add_argument("--ce-vocabs", default="49152,128256", help="vocabulary sizes of the chunked-CE runs")
    p.add_argument("--ce-seqs", default="2048,8192", help="row lengths of the chunked-CE runs")
    p.add_argument("--seq-len", type=int, default=1024, help="row length of the AC and EWC runs")
    p.add_argument("--short-seq", type=int, default=128, help="row length of the world-size runs")
    p.add_argument("--micro-rows", type=int, default=1, help="packed rows per rank per step")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--skip-steps", type=int, default=1, help="first steps left out of the step-time median")
    p.add_argument("--samples", type=int, default=300, help="synthetic training samples")
    p.add_argument("--fisher-batches", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--smoke",
        action="store_true",
        help="the tiny model, 2 steps, 1 and 2 ranks only; AC/EWC configs composed, not run (CI)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="compose every run's config (any machine, GPU runs included), launch nothing",
    )
    p.add_argument("--out", help="work directory (default: a new temporary directory, kept)")
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    if not set(args.only) <= set(ALL):
        p.error(f"--only: a subset of {', '.join(ALL)}")
    args.ce_vocabs = [int(v) for v in args.ce_vocabs.split(",") if v]
    args.ce_seqs = [int(v) for v in args.ce_seqs.split(",") if v]
    args.arch = dict(MEM_ARCH)
    if args.smoke:
        args.arch, args.seq_len, args.short_seq, args.steps, args.skip_steps, args.samples = {}, 128, 128, 2, 0, 40
        args.fisher_batches = 1
        args.freeze_blocks = 1
        args.ce_vocabs, args.ce_seqs = args.ce_vocabs[:1], args.ce_seqs[:1]
    return args


def main(argv=None) -> Dict:
    args = parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="fullft-memory-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    stamp = harness.stamp()
    tokenizer = harness.tiny_tokenizer()
    pool = harness.SentencePool(tokenizer)
    train, fisher = out / "data" / "train.jsonl", out / "data" / "fisher.jsonl"
    harness.write_alpaca(train, pool, args.samples, args.seed)
    harness.write_alpaca(fisher, pool, max(args.samples // 4, 8), args.seed + 2)
    args.fisher = str(fisher)
    data = {"train": train, "pairs": out / "data" / "pairs.jsonl", "pair_docs": out / "data" / "pair_docs.jsonl"}
    write_pairs(data["pairs"], data["pair_docs"], train)
    arch = {**harness.tiny_arch(), **args.arch}
    params = harness.param_count(arch, len(tokenizer))
    print(
        f"memory: {params / 1e6:.1f}M-parameter Llama in {out}; ZeRO-3 model states {STATE_BYTES} B x params = "
        f"{STATE_BYTES * params / 2**30:.2f} GiB in all; load average {stamp['load_avg_start']}",
        flush=True,
    )

    results, composed = [], []
    for run in runs(args):
        run_dir = out / "runs" / run.name.split(" (")[0].replace(" ", "_").replace("=", "")
        run_overrides = overrides(args, run, data, out / "cache", run_dir)
        if args.dry_run or (args.smoke and run.group != "ws"):
            harness.compose(run_overrides)  # CI: the typed config accepts these overrides; no training
            composed.append(run.name)
            print(f"  {run.name}: config composed, not run ({'--dry-run' if args.dry_run else '--smoke'})", flush=True)
            continue
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = harness.deepspeed_cmd("launch/train.py", run.ranks) + run_overrides
        load = harness.load_average()
        wall = harness.run_logged(cmd, out / "logs" / f"{run_dir.name}.log")
        result = {
            "name": run.name,
            "group": run.group,
            "ranks": run.ranks,
            "seq_len": run.seq_len,
            "overrides": run.overrides,
            "wall_s": round(wall, 1),
            "load_avg_before": load,
            **measure(harness.read_metrics(run_dir), run.ranks, args.skip_steps),
        }
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # GBs for the big model; not needed
        results.append(result)
        print(
            f"  {run.name}: peak {' / '.join(f'{m:.3f}' for m in result['peak_mem_gb_per_rank'])} GB per rank, "
            f"step {result['step_time_s']:.3f} s ({wall:.0f} s wall, load {load[0]})",
            flush=True,
        )

    summary = summarise(results, params, frozen_count(arch, len(tokenizer), args.freeze_blocks))
    by_name = {r["name"]: r for r in results}
    none = reference(by_name)

    def ref_of(r: Dict) -> Optional[Dict]:
        if r["group"] == "ce":
            return by_name.get(r["name"].replace("CE chunked", "CE full logits"))
        if r["group"] == "dpo":
            return by_name.get("SFT on the pair documents")
        if r["group"] == "freeze":
            return by_name.get("2 ranks")
        return by_name.get("1 rank") if r["group"] == "ws" else none

    print()
    print(
        f"Memory: {params / 1e6:.1f}M-parameter Llama, {args.micro_rows} packed row(s) per rank per step, "
        f"{args.steps} steps; step time = median after step {args.skip_steps}"
    )
    print(table(results, ref_of))
    if "ws_drop_gb" in summary:
        print(
            f"1 -> 2 ranks: per-rank peak x{summary['ws_peak_ratio']:.2f}, down {summary['ws_drop_gb']:.3f} GB; half "
            f"of the ZeRO-3 model states is {summary['ws_expected_drop_gb']:.3f} GiB "
            f"({100 * summary['ws_drop_vs_expected']:.0f}% of it observed)"
        )
    if "ewc_time_ratio" in summary:
        print(
            f"EWC: its own work {summary['ewc_own_time_s']:+.3f} s a step = "
            f"{100 * summary['ewc_own_time_share']:+.2f}% "
            f"of the step (target <= +{TARGET_EWC_COST:.0%}: "
            f"{'met' if summary['ewc_cost_target_met'] else 'NOT met'}); "
            f"whole step time {100 * (summary['ewc_time_ratio'] - 1):+.1f}% (machine noise included); memory "
            f"{summary['ewc_extra_gb']:+.3f} GB (Fisher + anchor: {summary['ewc_expected_extra_gb']:.3f} GiB per "
            "rank expected)"
        )
    if "freeze_mem_ratio" in summary:
        print(
            f"freezing {args.freeze_blocks} blocks + embeddings "
            f"({summary['freeze_frozen_params'] / 1e6:.1f}M parameters): "
            f"per-rank peak x{summary['freeze_mem_ratio']:.3f}, down {summary['freeze_drop_gb']:.3f} GB; "
            f"{FROZEN_SAVES} B x frozen / 2 ranks = {summary['freeze_expected_drop_gb']:.3f} GiB expected; step time "
            f"x{summary['freeze_time_ratio']:.3f}"
        )
    if "dpo_mem_ratio" in summary:
        print(
            f"DPO vs SFT on the same rows: peak memory x{summary['dpo_mem_ratio']:.3f} (target <= "
            f"x{TARGET_DPO_MEM:.2f}: {'met' if summary['dpo_mem_target_met'] else 'NOT met'}), step time "
            f"x{summary['dpo_time_ratio']:.3f}"
        )
    for k in sorted(k for k in summary if k.startswith("ce_") and k.endswith("_mem_ratio")):
        case = k[3 : -len("_mem_ratio")]
        print(f"chunked CE {case}: peak memory x{summary[k]:.3f}, step time x{summary[f'ce_{case}_time_ratio']:.3f}")
    if "ce_target_met" in summary:
        print(
            f"chunked CE at vocab 128k, seq 8k: target peak <= x{TARGET_CE_MEM:.2f} at step time <= "
            f"x{TARGET_CE_TIME:.2f}: {'met' if summary['ce_target_met'] else 'NOT met'}"
        )
    report = {
        **stamp,
        "load_avg_end": harness.load_average(),
        "params": params,
        "arch": arch,
        "args": {k: v for k, v in vars(args).items()},
        "results": results,
        "composed_only": composed,
        "summary": summary,
        "table": table(results, ref_of),
        "total_wall_s": round(time.perf_counter() - started, 1),
        "out": str(out),
    }
    for path in [out / "memory.json"] + ([Path(args.json)] if args.json else []):
        path.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out / 'memory.json'} ({report['total_wall_s']:.0f} s in all)")
    return report


if __name__ == "__main__":
    main()
