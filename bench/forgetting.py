"""Forgetting benchmark: how much general ability full fine-tuning loses, and what replay and EWC buy back.

    python bench/corpora.py --out /tmp/corpora     # gcide.txt (general English), foldoc.txt (computing)
    python bench/forgetting.py --general /tmp/corpora/gcide.txt --domain /tmp/corpora/foldoc.txt --out DIR
    python bench/forgetting.py --smoke --out DIR   # bundled data, a few steps (CI)

1. Split each corpus (any .txt/.md with blank-line-separated documents, or .jsonl, one record a line)
   deterministically into train and held-out files under DIR/data (a seeded shuffle, at most
   --max-docs documents, the first --heldout-docs of them held out).
2. Pretrain a random-init tiny Llama on the general train split (its sentencepiece tokenizer trained on
   both train splits), or reuse the one already in DIR/base-<key> (the key hashes the data and settings).
3. Fully fine-tune that base on the domain train split once per setting: `none`, `replay` at each
   --replay-ratios, `ewc` at each --lams, `ewc_replay` (--ewc-replay-lam, --ewc-replay-ratio).
   Every run is the real trainer through its command line (`launch/train.py` with overrides) under
   --launcher (`python`: one rank; `deepspeed`: --nproc sharded ZeRO-3 ranks), evaluating the held-out
   general and domain sets at step 0, at each quarter of the run and at the end. Fine-tunes are rerun
   every time (their directories are replaced); only the base is reused.
4. Read each run's metrics.jsonl and report, relative to `none`:
     forgetting  general held-out loss at the end minus at step 0 (> 0: forgot)
     removed     1 - forgetting / forgetting(none): the share of plain fine-tuning's forgetting removed
     gain        domain held-out loss at step 0 minus at the end (> 0: learned the domain)
     kept        gain / gain(none)
     step time   median perf/step_time_s over the steps after --skip-steps (a median, because other jobs
                 on a shared machine slow some steps), and the median time per step spent outside the
                 trainer's timed phases (forward/backward, optimizer, data wait): EWC's gradient work
                 runs there, so that time's excess over `none`'s, as a share of `none`'s step, is EWC's
                 own cost (column "outside-phase time vs none"; the EWC target is judged on it)
     peak mem    perf/peak_mem_gb (peak RSS on CPU, max allocated on a GPU), max over the run
   Print the table and write DIR/forgetting.json.

Target (issue 4): the best setting removes >= 90% of the forgetting while keeping >= 95% of the gain;
EWC costs <= 3% step time.

The real-model profile (--model DIR or --model smollm2_135m) skips pretraining: the pretrained model is
the base. It measures what the base loses on a fine-tune of continued pretraining, outside the trainer
(bench/drift.py): loss on held-out general text, loss of the base's own greedy answers to general chat
prompts (generated once, before any tuning), and KL(base || tuned) on the general text; domain gain on
held-out domain text. Every fine-tune is exported and scored, then scored again interpolated with the
start at each --alphas (θ0 + α(θ − θ0), trainer/forgetting/interpolation.py); plain fine-tuning is also scored on
a per-depth-group α grid (--group-alphas). "Removed" is judged on every forgetting measure on which
plain fine-tuning forgot (its smallest share), "kept" on the domain gain. Each method's Pareto
frontier over its knob is printed and drawn to DIR/frontier.png (bench/frontier.py).

    apt-get install -y dict-foldoc fortunes && python bench/corpora.py --out /tmp/corpora
    python bench/forgetting.py --model smollm2_135m --general /tmp/corpora/fortunes.txt \
        --domain /tmp/corpora/foldoc.txt --out /tmp/bench/forgetting_real        # < 1 hour on 2 cores
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import frontier  # noqa: E402
from harness import BUNDLED, git_head, launch_cmd, machine_line, read_metrics, run_logged, series  # noqa: E402

TEXT_SUFFIXES = (".txt", ".md")
TARGET_REMOVED, TARGET_KEPT, TARGET_EWC_COST = 0.90, 0.95, 0.03


# ---- corpora: deterministic train / held-out split --------------------------------------------------


def read_documents(path: Path) -> List[str]:
    """The documents of a corpus, as they will be written back: a .jsonl line each, or a block of
    non-blank lines of a text file (the data pipeline's own reading of these formats)."""
    if path.suffix == ".jsonl":
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix not in TEXT_SUFFIXES:
        raise SystemExit(f"{path}: use a .txt/.md file (documents separated by blank lines) or a .jsonl file")
    docs, block = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            block.append(line.rstrip())
        elif block:
            docs.append("\n".join(block))
            block = []
    if block:
        docs.append("\n".join(block))
    return docs


def _write_if_changed(path: Path, text: str) -> None:
    # The data pipeline's cache key includes the file's mtime: an unchanged split keeps its cache.
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.write_text(text, encoding="utf-8")


def split_corpus(path: Path, name: str, out: Path, max_docs: int, heldout_docs: int, seed: int) -> Dict:
    """Write out/<name>_train.<ext> and out/<name>_heldout.<ext>: a seeded shuffle of the documents,
    at most max_docs of them, the first heldout_docs held out."""
    docs = read_documents(path)
    if len(docs) < 2:
        raise SystemExit(f"{path}: {len(docs)} document(s); need at least 2 to split into train and held-out")
    order = list(range(len(docs)))
    random.Random(f"{seed}:{name}").shuffle(order)
    order = order[:max_docs]
    held = min(heldout_docs, max(1, len(order) // 5))  # a small corpus keeps most of it for training
    ext = ".jsonl" if path.suffix == ".jsonl" else ".txt"
    sep = "\n" if ext == ".jsonl" else "\n\n"
    files = {"train": out / f"{name}_train{ext}", "heldout": out / f"{name}_heldout{ext}"}
    out.mkdir(parents=True, exist_ok=True)
    _write_if_changed(files["heldout"], sep.join(docs[i] for i in order[:held]) + "\n")
    _write_if_changed(files["train"], sep.join(docs[i] for i in order[held:]) + "\n")
    return {
        "source": str(path),
        "documents": len(docs),
        "train_docs": len(order) - held,
        "heldout_docs": held,
        "train": str(files["train"]),
        "heldout": str(files["heldout"]),
        "train_mib": round(files["train"].stat().st_size / 2**20, 2),
    }


# ---- runs of the real trainer ----------------------------------------------------------------------


@dataclass
class Setting:
    name: str
    regularizer: str
    overrides: List[str] = field(default_factory=list)
    method: Optional[str] = None
    """The frontier it belongs to, when not its regularizer's (e.g. plain fine-tuning at other warmups)."""
    knob: Optional[str] = None
    family: Optional[str] = None
    """What --only selects it by (default: its regularizer): distill, freeze and lines run beside `none`."""

    @property
    def dirname(self) -> str:
        """The run's directory name: ASCII, no spaces, no `=` and no `+` (Hydra's override grammar rejects
        them in output_dir=...)."""
        name = self.name.replace(" ", "_").replace("λ=", "lam").replace("β=", "beta").replace("τ=", "tau")
        return name.replace("=", "").replace("+", "and")


def settings(args, rehearsal: Optional[Path] = None) -> List[Setting]:
    """Every fine-tune of the run; `rehearsal`: the base's own chat answers (real profile) for chat replay."""
    out = [Setting("none", "none")]
    for lr in args.lower_lrs:  # plain fine-tuning at a lower peak LR: a point of its own frontier
        out.append(Setting(f"none lr={lr:g}", "none", [f"trainer.optim.lr={lr}"], "plain (peak LR)", f"lr {lr:g}"))
    for w in args.warmups:  # plain fine-tuning re-warmed over another number of steps (0: none)
        out.append(
            Setting(f"none warmup={w}", "none", [f"trainer.schedule.warmup_steps={w}"], "plain (warmup)", f"warmup {w}")
        )
    for r in args.replay_ratios:
        out.append(Setting(f"replay {r:g}", "replay", [f"regularizer.replay.ratio={r}"]))
    for r in args.chat_replay_ratios if rehearsal else []:
        out.append(
            Setting(
                f"replay chat {r:g}",
                "replay",
                [
                    f"regularizer.replay.path={rehearsal}",
                    "regularizer.replay.format=messages",
                    "regularizer.replay.objective=instruct",
                    f"regularizer.replay.ratio={r}",
                ],
                "replay (own chat answers)",
                f"{r:g}",
            )
        )
    for labels in args.fisher_labels:
        tag = "" if labels == "data" else f" {labels}"  # the data-label Fisher keeps its old name
        for lam in args.lams:
            out.append(
                Setting(
                    f"ewc λ={lam:g}{tag}",
                    "ewc",
                    [f"regularizer.ewc.lam={lam}", f"regularizer.ewc.fisher_labels={labels}"],
                    f"ewc{tag}",
                    f"{lam:g}",
                )
            )
    if args.ewc_replay_ratio:
        labels = args.fisher_labels[0]
        tag = "" if labels == "data" else f" {labels}"
        out.append(
            Setting(
                f"ewc_replay λ={args.ewc_replay_lam:g} {args.ewc_replay_ratio:g}{tag}",
                "ewc_replay",
                [
                    f"regularizer.ewc.lam={args.ewc_replay_lam}",
                    f"regularizer.replay.ratio={args.ewc_replay_ratio}",
                    f"regularizer.ewc.fisher_labels={labels}",
                ],
                f"ewc_replay{tag}",
                f"{args.ewc_replay_lam:g} {args.ewc_replay_ratio:g}",
            )
        )
    if args.chat_ewc_replay_ratio and rehearsal:  # chat replay + EWC whose Fisher is on the same chats' answers
        labels = args.fisher_labels[0]
        tag = "" if labels == "data" else f" {labels}"
        out.append(
            Setting(
                f"ewc_replay chat λ={args.ewc_replay_lam:g} {args.chat_ewc_replay_ratio:g}{tag}",
                "ewc_replay",
                [
                    f"regularizer.replay.path={rehearsal}",
                    "regularizer.replay.format=messages",
                    "regularizer.replay.objective=instruct",
                    f"regularizer.replay.ratio={args.chat_ewc_replay_ratio}",
                    "regularizer.ewc.fisher_data=null",
                    f"regularizer.ewc.lam={args.ewc_replay_lam}",
                    f"regularizer.ewc.fisher_labels={labels}",
                ],
                f"ewc_replay chat{tag}",
                f"{args.ewc_replay_lam:g} {args.chat_ewc_replay_ratio:g}",
            )
        )
    for w in args.distill_weights:  # KL to the start on the replay data (tiny: general text) or the rehearsal
        own = [f"regularizer.distill.data={rehearsal}", "regularizer.distill.objective=instruct"] if rehearsal else []
        out.append(
            Setting(
                f"distill λ={w:g}",
                "none",
                [f"regularizer.distill.weight={w}", f"regularizer.distill.rows={args.distill_rows}", *own],
                "distill (KL to the start)" + (" on own chat answers" if rehearsal else ""),
                f"{w:g}",
                "distill",
            )
        )
    for tau in args.mft_taus:  # corrective targets on the domain tokens: the start's distribution, y raised to τ
        out.append(
            Setting(
                f"mft τ={tau:g}",
                "none",
                [f"regularizer.mft.tau={tau}"],
                "mft (corrective targets)",
                f"{tau:g}",
                "mft",
            )
        )
    if args.mft_taus and args.distill_weights:  # both: corrective targets and the KL on general/own answers
        tau, w = args.mft_taus[0], args.distill_weights[0]
        own = [f"regularizer.distill.data={rehearsal}", "regularizer.distill.objective=instruct"] if rehearsal else []
        out.append(
            Setting(
                f"mft τ={tau:g} + distill λ={w:g}",
                "none",
                [
                    f"regularizer.mft.tau={tau}",
                    f"regularizer.distill.weight={w}",
                    f"regularizer.distill.rows={args.distill_rows}",
                    *own,
                ],
                "mft + distill",
                f"{tau:g} {w:g}",
                "combined",
            )
        )
    for k in args.freeze_blocks:
        out.append(
            Setting(
                f"freeze {k}", "none", [f"regularizer.freeze.first_blocks={k}"], "freeze first blocks", str(k), "freeze"
            )
        )
    for b in args.lines_betas if not rehearsal else []:  # the trainer's own sweep, each α as LiNeS's (α, β)
        alphas = sorted({0.0, *(a for a in args.alphas if a + b <= 1)})
        out.append(
            Setting(
                f"none LiNeS β={b:g}",
                "none",
                [
                    f"regularizer.interpolation.beta={b}",
                    f"regularizer.interpolation.alphas=[{','.join(f'{a:g}' for a in alphas)}]",
                    "trainer.export_hf=true",
                ],
                family="lines",
            )
        )
    # none is the reference, always run
    return [s for s in out if (s.family or s.regularizer) == "none" or (s.family or s.regularizer) in args.only]


def train(args, overrides: Sequence[str], log_file: Path) -> float:
    """Run launch/train.py with `overrides`; its output goes to log_file. Returns the wall time."""
    return run_logged(launch_cmd(args.launcher, args.nproc) + list(overrides), log_file)


def common(args, data: Dict) -> List[str]:
    return [
        "stage=pretrain",
        "logger=jsonl",
        f"data.seq_len={args.seq_len}",
        f"trainer.micro_batch_size={args.micro_batch}",
        "trainer.grad_accum_steps=1",
        f"trainer.seed={args.train_seed}",
        "trainer.cadence.save_every_steps=0",
        "trainer.cadence.log_every_steps=1",
        f"+eval.sets.general={data['general']['heldout']}",
        f"+eval.sets.domain={data['domain']['heldout']}",
    ]


def base_overrides(args, data: Dict, out: Path) -> List[str]:
    g, d = data["general"]["train"], data["domain"]["train"]
    return common(args, data) + [
        "model=tiny",
        f"model.tokenizer_corpus=[{g},{d}]",
        f"data.path={g}",
        "regularizer=none",
        f"trainer.max_steps={args.base_steps}",
        f"trainer.optim.lr={args.base_lr}",
        f"trainer.schedule.warmup_steps={args.warmup}",
        f"trainer.cadence.eval_every_steps={args.base_steps}",
        f"output_dir={out}",
    ]


def finetune_overrides(args, data: Dict, base: Path, setting: Setting, out: Path) -> List[str]:
    g = data["general"]["train"]
    return merged(
        common(args, data)
        + [
            f"model.name_or_path={base}/hf",
            f"data.path={data['domain']['train']}",
            f"regularizer={setting.regularizer}",
            f"regularizer.replay.path={g}",
            f"regularizer.ewc.fisher_data={g}",
            f"regularizer.ewc.fisher_batches={args.fisher_batches}",
            f"trainer.max_steps={args.steps}",
            f"trainer.optim.lr={args.lr}",
            f"trainer.schedule.warmup_steps={args.warmup}",
            # the forgetting curve at quarters of the run (a short run: only at the start and the end)
            f"trainer.cadence.eval_every_steps={args.steps // 4 if args.steps >= 8 else args.steps}",
            # with --alphas, the trainer's own end-of-stage sweep scores θ0 + α(θ − θ0) (it needs the export)
            *(
                [
                    f"regularizer.interpolation.alphas=[{','.join(f'{a:g}' for a in args.alphas)}]",
                    "trainer.export_hf=true",
                ]
                if args.alphas
                else ["trainer.export_hf=false"]
            ),
            f"output_dir={out}",
        ],
        setting.overrides,
    )


def merged(overrides: Sequence[str], extra: Sequence[str]) -> List[str]:
    """`overrides` with `extra` appended, an entry of `overrides` for a key that `extra` sets dropped
    (Hydra refuses two values for one key)."""
    keys = {e.split("=", 1)[0].lstrip("+") for e in extra}
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+") not in keys] + list(extra)


def base_key(args, data: Dict) -> str:
    """Identity of the pretrained base: its data (content) and every setting that shapes it."""
    h = hashlib.sha256()
    for split in ("train", "heldout"):
        for corpus in ("general", "domain"):  # the tokenizer is trained on both train splits
            h.update(Path(data[corpus][split]).read_bytes())
    h.update(
        json.dumps(
            [
                args.base_steps,
                args.base_lr,
                args.seq_len,
                args.micro_batch,
                args.seed,
                args.warmup,
                args.launcher,
                args.nproc,
            ]
        ).encode()
    )
    return h.hexdigest()[:12]


def summarise(rows: List[Dict], skip_steps: int) -> Dict:
    general, domain = series(rows, "eval/general/loss"), series(rows, "eval/domain/loss")
    if 0 not in general or 0 not in domain:
        raise SystemExit("metrics.jsonl has no step-0 eval of both held-out sets (eval.at_start)")
    last = max(general)
    step_time = series(rows, "perf/step_time_s")
    steps = [s for s in sorted(step_time) if s > skip_steps] or sorted(step_time)
    phased = {
        s: sum(r.get(f"perf/{p}_s", 0.0) for p in ("data_wait", "forward_backward", "optimizer"))
        for r in rows
        if "perf/step_time_s" in r
        for s in [r["step"]]
    }
    mem = series(rows, "perf/peak_mem_gb")
    penalty = series(rows, "reg/ewc_penalty")
    replay = series(rows, "data/replay_token_fraction")
    return {
        "general_start": general[0],
        "general_end": general[last],
        "domain_start": domain[0],
        "domain_end": domain[last],
        "forgetting": general[last] - general[0],
        "gain": domain[0] - domain[last],
        "general_curve": general,
        "domain_curve": domain,
        "final_step": last,
        "step_time_s": statistics.median(step_time[s] for s in steps),
        "unphased_time_s": statistics.median(step_time[s] - phased[s] for s in steps),
        "peak_mem_gb": max(mem.values()) if mem else None,
        "final_train_loss": series(rows, "train/loss").get(last),
        "ewc_penalty_end": penalty.get(last),
        "replay_token_fraction": statistics.mean(replay.values()) if replay else None,
    }


def tiny_points(results: List[Dict]) -> List[Dict]:
    """Every fine-tune at its end and, when the trainer swept α, at each α, as frontier points
    (removed and kept against `none` at its end: results[0])."""
    ref = results[0]
    g0, d0 = ref["general_start"], ref["domain_start"]  # every fine-tune starts from the same base

    def point(method: str, knob: str, general: float, domain: float, setting: str, alpha: str) -> Dict:
        return {
            "method": method,
            "knob": knob,
            "setting": setting,
            "alpha": alpha,
            "removed": 1 - (general - g0) / ref["forgetting"] if ref["forgetting"] > 0 else None,
            "kept": (d0 - domain) / ref["gain"] if ref["gain"] > 0 else None,
        }

    points = []
    for r in results:
        points.append(point(r["method"], r["knob"], r["general_end"], r["domain_end"], r["setting"], "1"))
        for row in (r.get("interpolation") or {}).get("rows", []):
            if row["alpha"] != 1.0:
                points.append(
                    point(
                        f"interpolation: {r['setting']}",
                        f"α {row['alpha']:g}",
                        row["eval/general/loss"],
                        row["eval/domain/loss"],
                        r["setting"],
                        f"{row['alpha']:g}",
                    )
                )
    return points


def relative(results: List[Dict]) -> None:
    """Add the ratios against `none` (the first result) in place."""
    ref = results[0]
    for r in results:
        r["forgetting_removed"] = 1 - r["forgetting"] / ref["forgetting"] if ref["forgetting"] > 0 else None
        r["gain_kept"] = r["gain"] / ref["gain"] if ref["gain"] > 0 else None
        r["step_time_vs_none"] = r["step_time_s"] / ref["step_time_s"] - 1
        # Time per step outside forward/backward/optimizer/data, beyond none's, as a share of none's step
        r["extra_unphased_vs_none"] = (r["unphased_time_s"] - ref["unphased_time_s"]) / ref["step_time_s"]
        r["peak_mem_vs_none_gb"] = (
            r["peak_mem_gb"] - ref["peak_mem_gb"]
            if r["peak_mem_gb"] is not None and ref["peak_mem_gb"] is not None
            else None
        )
        r["meets_target"] = (
            r["forgetting_removed"] is not None
            and r["gain_kept"] is not None
            and r["forgetting_removed"] >= TARGET_REMOVED
            and r["gain_kept"] >= TARGET_KEPT
        )


def verdict(results: List[Dict]) -> Dict:
    ref = results[0]
    others = [r for r in results[1:] if r["forgetting_removed"] is not None and r["gain_kept"] is not None]
    meeting = [r for r in others if r["meets_target"]]
    # "Best": the most forgetting removed among the settings that keep the gain; else the best trade-off
    keep = [r for r in others if r["gain_kept"] >= TARGET_KEPT]
    best = max(
        keep or others,
        key=lambda r: (
            r["forgetting_removed"]
            if keep
            else min(r["forgetting_removed"] / TARGET_REMOVED, r["gain_kept"] / TARGET_KEPT)
        ),
        default=None,
    )
    ewc = [r for r in results if r["regularizer"] in ("ewc", "ewc_replay")]
    return {
        "none_forgets": ref["forgetting"] > 0,
        "none_gains": ref["gain"] > 0,
        "best_setting": best["setting"] if best else None,
        "forgetting_target_met": bool(meeting),
        "settings_meeting_target": [r["setting"] for r in meeting],
        "ewc_step_time_vs_none_max": max((r["step_time_vs_none"] for r in ewc), default=None),
        "ewc_extra_unphased_vs_none_max": max((r["extra_unphased_vs_none"] for r in ewc), default=None),
        # EWC's cost is judged on its own time per step (outside the timed phases, beyond none's), which
        # a busy shared machine inflates far less than it does the whole step's; both are reported.
        "ewc_cost_target_met": all(r["extra_unphased_vs_none"] <= TARGET_EWC_COST for r in ewc) if ewc else None,
        "ewc_step_time_target_met_raw": all(r["step_time_vs_none"] <= TARGET_EWC_COST for r in ewc) if ewc else None,
    }


# ---- the table ---------------------------------------------------------------------------------------


def _pct(x: Optional[float], signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:+.1f}%" if signed else f"{100 * x:.0f}%"


def table(results: List[Dict]) -> str:
    head = (
        "| setting | general loss start → end | forgetting | removed | domain loss start → end | gain | kept "
        "| step time (s) | vs none | outside-phase time vs none | peak mem (GB) | vs none | target |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|"]
    for r in results:
        mem_delta = "–" if r["peak_mem_vs_none_gb"] is None else f"{r['peak_mem_vs_none_gb']:+.3f}"
        lines.append(
            f"| {r['setting']} | {r['general_start']:.3f} → {r['general_end']:.3f} | {r['forgetting']:+.3f} "
            f"| {_pct(r['forgetting_removed'])} | {r['domain_start']:.3f} → {r['domain_end']:.3f} | {r['gain']:+.3f} "
            f"| {_pct(r['gain_kept'])} | {r['step_time_s']:.3f} | {_pct(r['step_time_vs_none'], True)} "
            f"| {_pct(r['extra_unphased_vs_none'], True)} "
            f"| {r['peak_mem_gb']:.3f} | {mem_delta} | {'yes' if r['meets_target'] else 'no'} |"
        )
    return "\n".join(lines)


# ---- the real-model profile (--model) -------------------------------------------------------------

# The forgetting measures the target is judged on (kl: reported beside). chat_sampled's rise over the
# base is an unbiased estimate of KL(base || tuned) on chat (bench/drift.py): a model that only got
# sharper, or more like its greedy self, lowers `chat` but not it.
MEASURES = ("general", "chat", "chat_sampled")
# What the real profile leaves out against the tiny one, said at its start (the 60-minute budget).
REAL_LEAVES_OUT = [
    "pretraining a base (the pretrained model is the base)",
    "EWC at λ=1 (on this model it all but replaced the domain gradient: grad norm ~5 -> ~318; "
    "conf/model/smollm2_135m.yaml) unless --lams asks for it",
    "the trainer's in-run evals and step-time columns (the probe scores each export; one rank shares 2 cores "
    "with nothing, but a 20-step median says little)",
    "per-group α for any fine-tune but plain fine-tuning (--group-alphas)",
    "more seeds: one training seed per setting (--train-seed reruns with another)",
    "corrective targets and distillation together (--only combined: dominated in BENCHMARKS.md, ~12 min more)",
]


# Rehearsal prompts for the real profile's chat replay: general tasks on short general-train documents
# (none of the probe's prompts: those score the chat drift, so nothing trains on them).
REHEARSAL_TASKS = [
    "What does this saying mean? Answer briefly.\n\n{doc}",
    "Give this text a short title.\n\n{doc}",
    "Explain this to a ten-year-old in two sentences.\n\n{doc}",
    "Do you agree with this? Say why in a sentence or two.\n\n{doc}",
]


def rehearsal_prompts(docs: Sequence[str], n: int, seed: int, max_chars: int = 300) -> List[str]:
    """n prompts: the tasks in turn, each on a document (seeded choice, the short ones first; a longer one
    is cut at a word boundary to max_chars)."""
    order = list(docs)
    random.Random(f"{seed}:rehearsal").shuffle(order)
    order.sort(key=lambda d: len(d) > max_chars)  # stable: the short ones first, in shuffled order
    cut = [d if len(d) <= max_chars else d[:max_chars].rsplit(" ", 1)[0] + " ..." for d in order[:n]]
    return [REHEARSAL_TASKS[i % len(REHEARSAL_TASKS)].format(doc=d) for i, d in enumerate(cut)]


def build_rehearsal(
    model_dir: Path, docs: Sequence[str], out: Path, n: int, max_new_tokens: int, seed: int, keep_cut_off: bool = False
) -> Dict:
    """The base's own greedy answers to rehearsal_prompts, as a messages JSONL (trainer/forgetting/rehearsal.py),
    cached at `out` (keyed by the caller). Answers cut off at max_new_tokens are dropped unless
    keep_cut_off (the smoke's depth-reduced model never ends a turn), as launch/rehearse.py does."""
    import drift
    from transformers import AutoTokenizer

    from trainer.forgetting import rehearsal

    meta = out.with_suffix(".json")
    if out.is_file() and meta.is_file():
        return json.loads(meta.read_text())
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompts = rehearsal_prompts(docs, n, seed)
    kept = [
        a
        for a in rehearsal.answers(drift.load_model(model_dir), tok, prompts, max_new_tokens)
        if a.text and (a.finished or keep_cut_off)
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(rehearsal.record(a), ensure_ascii=False) + "\n" for a in kept), encoding="utf-8")
    info = {
        "path": str(out),
        "prompts": len(prompts),
        "answers": len(kept),
        "dropped_cut_off": len(prompts) - len(kept),
        "answer_tokens": sum(len(a.answer_ids) for a in kept),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    meta.write_text(json.dumps(info, indent=1))
    return info


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def check_disjoint(records: Sequence[Dict], probe_prompts: Sequence[str], heldout_docs: Sequence[str]) -> Dict:
    """Nothing the rehearsal trains on is probed: no probe prompt occurs in a rehearsal prompt and no
    held-out general document (the general and KL probes) in one (case and spacing ignored). Raises
    naming the first overlap; returns the counts checked."""
    users = [_norm(m["content"]) for r in records for m in r["messages"] if m["role"] == "user"]
    for probe in probe_prompts:
        hit = next((u for u in users if _norm(probe) in u), None)
        if hit is not None:
            raise SystemExit(f"rehearsal prompt {hit[:80]!r} contains the probe prompt {probe!r}")
    held = {_norm(d) for d in heldout_docs if len(_norm(d)) >= 20}
    for u in users:
        hit = next((d for d in held if d in u), None)
        if hit is not None:
            raise SystemExit(f"rehearsal prompt {u[:80]!r} contains the held-out document {hit[:80]!r}")
    return {"rehearsal_prompts": len(users), "probe_prompts": len(probe_prompts), "heldout_docs": len(held)}


def resolve_model(spec: str) -> Path:
    """--model: a Hugging Face directory, or the name of a model `launch/import_model.py` imports."""
    from trainer.engine.model_import import model_dir_of

    try:
        return model_dir_of(spec)
    except ValueError as e:
        raise SystemExit(f"--model {e}") from None


def real_overrides(args, data: Dict, model_dir: Path, setting: Setting, out: Path) -> List[str]:
    """A fine-tune of the real model: no in-run evaluation (the probe scores the export), exported."""
    g = data["general"]["train"]
    model = ["model=smollm2_135m"] if args.model == "smollm2_135m" else []
    return merged(
        [
            "stage=pretrain",
            "logger=jsonl",
            "logger.dashboard=false",
            "eval.sample_prompts=[]",
            *model,
            f"model.name_or_path={model_dir}",
            f"data.seq_len={args.seq_len}",
            f"trainer.micro_batch_size={args.micro_batch}",
            "trainer.grad_accum_steps=1",
            f"trainer.seed={args.train_seed}",
            "trainer.cadence.save_every_steps=0",
            "trainer.cadence.log_every_steps=1",
            f"data.path={data['domain']['train']}",
            f"regularizer={setting.regularizer}",
            f"regularizer.replay.path={g}",
            f"regularizer.ewc.fisher_data={g}",
            f"regularizer.ewc.fisher_batches={args.fisher_batches}",
            f"trainer.max_steps={args.steps}",
            f"trainer.optim.lr={args.lr}",
            f"trainer.schedule.warmup_steps={args.warmup}",
            "trainer.cadence.eval_every_steps=0",
            "trainer.export_hf=true",
            f"output_dir={out}",
        ],
        setting.overrides,
    )


def method_of(setting: Setting) -> Tuple[str, str]:
    """(method, knob) of a fine-tune for the frontiers: plain fine-tuning's knob is its peak LR."""
    if setting.method:
        return setting.method, setting.knob or "-"
    if setting.regularizer == "none":
        return "plain (peak LR)", "default lr"
    return setting.regularizer, " ".join(o.split("=", 1)[1] for o in setting.overrides)


def drift_point(setting: str, method: str, knob: str, alpha: str, scores: Dict[str, float]) -> Dict:
    return {"setting": setting, "method": method, "knob": knob, "alpha": alpha, "scores": scores}


def relate(points: List[Dict], base: Dict[str, float], reference: Dict[str, float]) -> None:
    """Forgetting per measure (general and chat loss above the base's, KL from the base), the share of
    the reference's (plain fine-tuning's) removed, the domain gain and its share kept; in place.
    `removed` is the smallest share removed over the measures on which the reference forgot."""
    ref_forgot = {m: reference[m] - base[m] for m in MEASURES}
    ref_forgot["kl"] = reference["kl"]
    ref_gain = base["domain"] - reference["domain"]
    for p in points:
        sc = p["scores"]
        forgot = {m: sc[m] - base[m] for m in MEASURES}
        forgot["kl"] = sc["kl"]
        p["forgetting"] = forgot
        p["removed_by"] = {m: (1 - forgot[m] / ref_forgot[m]) if ref_forgot[m] > 0 else None for m in forgot}
        judged = [p["removed_by"][m] for m in MEASURES if p["removed_by"][m] is not None]
        p["removed"] = min(judged) if judged else None
        p["gain"] = base["domain"] - sc["domain"]
        p["kept"] = p["gain"] / ref_gain if ref_gain > 0 else None
        p["meets_target"] = (
            p["removed"] is not None
            and p["kept"] is not None
            and p["removed"] >= TARGET_REMOVED
            and p["kept"] >= TARGET_KEPT
        )


def real_table(points: List[Dict], base: Dict[str, float]) -> str:
    head = (
        "| setting | α | general loss | chat loss (greedy) | chat loss (sampled) | KL from base | domain loss "
        "| removed: general / chat greedy / chat sampled / KL | removed (judged) | gain kept | target |"
    )
    lines = [
        head,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|:-:|",
        f"| base (start) | 0 | {base['general']:.3f} | {base['chat']:.3f} | {base['chat_sampled']:.3f} | 0 "
        f"| {base['domain']:.3f} | – | – | – | – |",
    ]
    for p in points:
        sc, r = p["scores"], p["removed_by"]
        lines.append(
            f"| {p['setting']} | {p['alpha']} | {sc['general']:.3f} | {sc['chat']:.3f} | {sc['chat_sampled']:.3f} "
            f"| {sc['kl']:.4f} | {sc['domain']:.3f} "
            f"| {_pct(r['general'])} / {_pct(r['chat'])} / {_pct(r['chat_sampled'])} / {_pct(r['kl'])} "
            f"| {_pct(p['removed'])} | {_pct(p['kept'])} | {'yes' if p['meets_target'] else 'no'} |"
        )
    return "\n".join(lines)


def group_grid(values: Sequence[float]) -> List[Dict[str, float]]:
    """Every per-group α from `values`, minus the uniform ones (the uniform sweep has them)."""
    import itertools

    from trainer.forgetting.interpolation import GROUPS

    return [dict(zip(GROUPS, combo)) for combo in itertools.product(values, repeat=len(GROUPS)) if len(set(combo)) > 1]


def task_scores(model, tokenizer, args) -> Dict[str, float]:
    """lm-eval's numbers for a model in memory (lm-eval's own HF model class: what `lm_eval --model hf`
    reports), on the bundled tasks (trainer/harness_tasks/): --tasks on plain prompts, --chat-tasks through the
    chat template; at most --task-limit items a task. Keys: <task>/<metric>."""
    if not (args.tasks or args.chat_tasks):
        return {}
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from trainer.harness import metrics_of, task_manager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, max_length=1024)
    out: Dict[str, float] = {}
    for tasks, chat in ((args.tasks, False), (args.chat_tasks, True)):
        if tasks:
            results = lm_eval.simple_evaluate(
                model=lm, tasks=list(tasks), limit=args.task_limit, apply_chat_template=chat,
                task_manager=task_manager([], tasks), bootstrap_iters=0, log_samples=False,
            )  # fmt: skip
            out.update({k.removeprefix("eval/harness/"): v for k, v in metrics_of(results).items()})
    return {k: v for k, v in out.items() if not k.endswith("_stderr")}


TASK_COLUMNS = (
    ("general task", "fullft_general/acc_norm", -1),
    ("domain task", "fullft_computing/acc_norm", 1),
    ("instruction following", "fullft_ifeval/prompt_level_acc", -1),
)
"""The task-level columns of the real profile: (title, metric, +1 = a gain measure, -1 = a forgetting one)."""


def task_table(rows: List[Dict], base: Dict[str, float]) -> str:
    """Task scores of the base and of each fine-tune at α=1, with the change from the base."""
    head = "| setting | " + " | ".join(t for t, _, _ in TASK_COLUMNS) + " |"
    lines = [head, "|---|" + "---:|" * len(TASK_COLUMNS)]
    for name, scores in [("base", base)] + [(r["setting"], r["tasks"]) for r in rows]:
        cells = []
        for _, key, _ in TASK_COLUMNS:
            if key not in scores:
                cells.append("–")
            elif name == "base":
                cells.append(f"{scores[key]:.3f}")
            else:
                cells.append(f"{scores[key]:.3f} ({scores[key] - base[key]:+.3f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def real_main(args) -> Dict:
    """Fine-tune the real model once per setting; score each export and its interpolations with the
    start on the probe (bench/drift.py); report against plain fine-tuning and draw the frontiers."""
    import drift
    import torch
    from safetensors.torch import load_file

    from trainer.forgetting.interpolation import alpha_label, interpolate

    out = Path(args.out).resolve()
    started, commit = time.perf_counter(), git_head()
    model_dir = resolve_model(args.model)
    print(
        f"real-model profile: {model_dir}; {len(settings(args, out))} fine-tunes of {args.steps} steps; left out: "
        + "; ".join(REAL_LEAVES_OUT),
        flush=True,
    )
    data = {
        name: split_corpus(Path(path).resolve(), name, out / "data", args.max_docs, args.heldout_docs, args.seed)
        for name, path in (("general", args.general), ("domain", args.domain))
    }
    for name, d in data.items():
        print(
            f"{name}: {d['source']} -> {d['train_docs']:,} train / {d['heldout_docs']:,} held-out documents "
            f"({d['train_mib']} MiB train)",
            flush=True,
        )
    held = {n: Path(d["heldout"]) for n, d in data.items()}
    probe_settings = {
        "text_tokens": args.probe_tokens,
        "answer_tokens": args.answer_tokens,
        "top_k": args.top_k,
        "prompts": args.prompts,
        "sampled_answers": args.seed,  # the sampled chat answers' seed (a probe without them is not reused)
    }
    cache = out / "probe" / f"probe-{drift.key(model_dir, held['general'], held['domain'], probe_settings)}.pt"
    t0 = time.perf_counter()
    prompts = drift.CHAT_PROMPTS[: args.prompts]
    probe = drift.build_probe(
        model_dir,
        read_documents(held["general"]),
        read_documents(held["domain"]),
        cache,
        text_tokens=args.probe_tokens,
        answer_tokens=args.answer_tokens,
        top_k=args.top_k,
        prompts=prompts,
        sample_seed=args.seed,
    )
    print(
        f"probe: {probe.tokens()} scored tokens, {len(probe.answers)} base answers ({cache}, "
        f"{time.perf_counter() - t0:.0f} s)",
        flush=True,
    )

    rehearsal, info = None, None
    if (
        (args.chat_replay_ratios and "replay" in args.only)
        or (args.chat_ewc_replay_ratio and "ewc_replay" in args.only)
        or (args.distill_weights and ("distill" in args.only or "combined" in args.only))
    ):
        train_sha = hashlib.sha256(Path(data["general"]["train"]).read_bytes()).hexdigest()  # content, not path
        rkey = hashlib.sha256(
            json.dumps(
                [
                    cache.name,
                    train_sha,
                    args.rehearsal_prompts,
                    args.rehearsal_tokens,
                    args.seed,
                    args.rehearsal_keep_cut_off,
                ]
            ).encode()
        ).hexdigest()[:12]
        info = build_rehearsal(
            model_dir,
            read_documents(Path(data["general"]["train"])),
            out / "probe" / f"rehearsal-{rkey}.jsonl",
            args.rehearsal_prompts,
            args.rehearsal_tokens,
            args.seed,
            args.rehearsal_keep_cut_off,
        )
        if not info["answers"]:
            raise SystemExit(
                f"rehearsal: none of the base's {info['prompts']} answers ended within "
                f"--rehearsal-tokens={args.rehearsal_tokens}; raise it"
            )
        rehearsal = Path(info["path"])
        info["disjoint_from_probe"] = check_disjoint(
            [json.loads(line) for line in rehearsal.read_text(encoding="utf-8").splitlines()],
            prompts,
            read_documents(held["general"]),
        )
        print(
            f"rehearsal prompts vs the probe: {info['disjoint_from_probe']['rehearsal_prompts']} rehearsal prompts, "
            f"{info['disjoint_from_probe']['probe_prompts']} probe prompts, "
            f"{info['disjoint_from_probe']['heldout_docs']} held-out documents: disjoint",
            flush=True,
        )
        print(
            f"rehearsal (chat replay): the base's answers to {info['answers']} of {info['prompts']} prompts on general "
            f"train documents ({info['answer_tokens']} answer tokens; {info['dropped_cut_off']} dropped, cut off at "
            f"{args.rehearsal_tokens} tokens) -> {rehearsal} ({info['seconds']:.0f} s)",
            flush=True,
        )

    model = drift.load_model(model_dir)
    num_layers = model.config.num_hidden_layers
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base = drift.score(model, probe, pad)
    print(f"base: {json.dumps({k: round(v, 4) for k, v in base.items()})}", flush=True)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    t0 = time.perf_counter()
    base_tasks = task_scores(model, tokenizer, args)
    if base_tasks:
        print(
            f"base tasks ({time.perf_counter() - t0:.0f} s): "
            + json.dumps({k: round(v, 4) for k, v in base_tasks.items()}),
            flush=True,
        )

    def score_at(tuned: Dict[str, torch.Tensor], alpha) -> Dict[str, float]:
        missing, unexpected = model.load_state_dict(interpolate(start, tuned, alpha, num_layers), strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise SystemExit(f"export does not match {model_dir}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return drift.score(model, probe, pad)

    points, runs = [], []
    for s in settings(args, rehearsal):
        run_dir = out / "runs" / s.dirname
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"fine-tune {s.name}: {args.steps} steps -> {run_dir}", flush=True)
        wall = train(args, real_overrides(args, data, model_dir, s, run_dir), out / "logs" / f"{run_dir.name}.log")
        t0 = time.perf_counter()
        tuned = load_file(str(run_dir / "hf" / "model.safetensors"))
        method, knob = method_of(s)
        mine = [drift_point(s.name, method, knob, "1", score_at(tuned, 1.0))]
        tasks = task_scores(model, tokenizer, args)  # the export at α=1, loaded by score_at
        for a in sorted(args.alphas, reverse=True):
            mine.append(drift_point(s.name, f"interpolation: {s.name}", f"α {a:g}", f"{a:g}", score_at(tuned, a)))
        if s.name == "none" and args.group_alphas:
            for a in group_grid(args.group_alphas):
                label = alpha_label(a)
                mine.append(
                    drift_point(
                        s.name,
                        "interpolation per group: none",
                        label.replace("bottom=", "b").replace("middle=", "m").replace("top=", "t"),
                        label,
                        score_at(tuned, a),
                    )
                )
        rows = read_metrics(run_dir)
        losses = series(rows, "train/loss")
        step_time = series(rows, "perf/step_time_s")
        runs.append(
            {
                "setting": s.name,
                "overrides": s.overrides,
                "wall_s": round(wall, 1),
                "score_wall_s": round(time.perf_counter() - t0, 1),
                "final_train_loss": losses.get(max(losses)),
                "tasks": tasks,
                "step_time_s": statistics.median(step_time.values()) if step_time else None,
                "replay_token_fraction": statistics.mean(series(rows, "data/replay_token_fraction").values())
                if series(rows, "data/replay_token_fraction")
                else None,
            }
        )
        points += mine
        print(
            f"  {len(mine)} points scored in {time.perf_counter() - t0:.0f} s; the export at α=1: "
            f"{json.dumps({k: round(v, 4) for k, v in mine[0]['scores'].items()})}",
            flush=True,
        )
        if not args.keep_runs:  # 2 GB of checkpoint and 0.5 GB of export a run; metrics.jsonl stays
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            shutil.rmtree(run_dir / "hf", ignore_errors=True)

    reference = points[0]["scores"]  # none at α=1
    relate(points, base, reference)
    fronts = frontier.frontiers(points)
    best = frontier.best_trade_off(points[1:], TARGET_REMOVED, TARGET_KEPT)
    png = frontier.plot(
        points[1:],
        out / "frontier.png",
        f"{model_dir.name}: {args.steps} steps on {Path(args.domain).name}; forgetting removed = min over "
        f"{' and '.join(MEASURES)} loss",
        TARGET_REMOVED,
        TARGET_KEPT,
    )
    shown = [p for p in points if not p["method"].startswith("interpolation per group")]
    grouped = [p for p in fronts.get("interpolation per group: none", [])]
    print()
    print(
        f"Forgetting, real model {model_dir.name}: {args.steps} steps x {args.micro_batch} x {args.seq_len} tokens of "
        f"{Path(args.domain).name}, lr {args.lr:g}; general text {Path(args.general).name}; chat: the base's greedy "
        f"answers to {len(probe.answers)} prompts"
    )
    print(real_table(points[:1] + [p for p in shown[1:]], base))
    if grouped:
        print("\nper-group interpolation of `none` (bottom / middle / top α): its Pareto frontier")
        print(real_table(grouped, base))
    if base_tasks:
        print(
            f"\ntask-level (lm-eval, bundled tasks, at most {args.task_limit or 'all'} items a task), "
            "each export at α=1"
        )
        print(task_table(runs, base_tasks))
    meeting = [p for p in points[1:] if p["meets_target"]]
    print(
        f"target: >= {TARGET_REMOVED:.0%} of the forgetting removed (on every measure where plain fine-tuning forgot) "
        f"with >= {TARGET_KEPT:.0%} of the gain kept: "
        + (
            f"met by {len(meeting)} point(s), best {meeting and frontier.best_trade_off(meeting, 0, 0)['setting']}"
            if meeting
            else "NOT met"
        )
        + (
            f"; closest: {best['setting']} α {best['alpha']} (removed {_pct(best['removed'])}, kept "
            f"{_pct(best['kept'])})"
            if best
            else ""
        )
    )
    print(f"frontiers: {png}")
    report = {
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "machine": machine_line(),
        "profile": "real",
        "model": str(model_dir),
        "args": {k: v for k, v in vars(args).items()},
        "data": data,
        "probe": {"cache": str(cache), "tokens": probe.tokens(), "answers": probe.answers},
        "base": base,
        "base_tasks": base_tasks,
        "rehearsal": info if rehearsal else None,
        "runs": runs,
        "points": points,
        "frontiers": fronts,
        "best": best,
        "target_met": bool(meeting),
        "total_wall_s": round(time.perf_counter() - started, 1),
    }
    (out / "forgetting.json").write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str))
    print(f"wrote {out / 'forgetting.json'} ({report['total_wall_s']:.0f} s in all)")
    return report


# ---- main ------------------------------------------------------------------------------------------


def _floats(text: str) -> List[float]:
    return [float(x) for x in text.split(",") if x.strip()]


# Per profile: the tiny model pretrained here (default), the real model (--model), the CI smoke runs.
PROFILES = {
    "tiny": dict(
        steps=200,
        base_steps=600,
        lr=1e-3,
        base_lr=1e-3,
        warmup=10,
        seq_len=512,
        micro_batch=4,
        heldout_docs=500,
        lams=[0.01, 0.1, 1.0],
        replay_ratios=[0.05, 0.25],
        ewc_replay_ratio=0.05,
        fisher_batches=8,
        lower_lrs=[],
        alphas=[0.25, 0.5, 0.75],
        group_alphas=[],
        skip_steps=5,
        warmups=[],
        fisher_labels=["data"],
        chat_replay_ratios=[],
        distill_weights=[1.0],
        distill_rows=2,
        freeze_blocks=[1],
        lines_betas=[0.5],
        mft_taus=[0.5],
        only=["replay", "ewc", "ewc_replay", "distill", "freeze", "lines", "mft"],
    ),
    # SmolLM2-135M on 2 CPU cores, one rank: ~8 s a 512-token step, ~20 s to score a model on the probe,
    # ~4 min on the lm-eval tasks at 100 items. The default: the contenders of the earlier sweeps (chat
    # replay, distillation and corrective targets) beside plain tuning, each at α 1 and 0.75, in under an
    # hour; the two together, EWC, raw-text replay, a lower LR, freezing and the per-group α grid by
    # asking (--only, --lams, --replay-ratios, --lower-lrs, --group-alphas).
    "real": dict(
        steps=20,
        lr=1e-4,
        warmup=2,
        seq_len=512,
        micro_batch=1,
        heldout_docs=200,
        lams=[0.1],
        replay_ratios=[],
        ewc_replay_ratio=0,
        fisher_batches=4,
        lower_lrs=[],
        alphas=[0.75],
        group_alphas=[],
        skip_steps=2,
        warmups=[],
        fisher_labels=["data"],
        chat_replay_ratios=[0.25],
        distill_weights=[1.0],
        distill_rows=1,
        freeze_blocks=[6],
        lines_betas=[],
        mft_taus=[0.5],
        task_limit=100,
        only=["replay", "distill", "mft"],
    ),
    "smoke": dict(
        steps=3,
        base_steps=3,
        seq_len=128,
        warmup=1,
        skip_steps=0,
        heldout_docs=20,
        fisher_batches=1,
        lams=[1.0],
        replay_ratios=[0.25],
        alphas=[0.5],
        fisher_labels=["sampled"],
        distill_rows=1,
    ),
    "real_smoke": dict(
        steps=2,
        seq_len=128,
        warmup=1,
        skip_steps=0,
        heldout_docs=20,
        fisher_batches=1,
        lams=[1.0],
        replay_ratios=[],
        chat_replay_ratios=[0.25],
        fisher_labels=["sampled"],
        lower_lrs=[],
        ewc_replay_ratio=0,
        chat_ewc_replay_ratio=0.25,
        alphas=[0.5],
        group_alphas=[0.5, 1.0],
        freeze_blocks=[],
        lr=1e-3,
        probe_tokens=200,
        answer_tokens=8,
        prompts=3,
        rehearsal_prompts=4,
        rehearsal_tokens=16,
        rehearsal_keep_cut_off=True,
        task_limit=4,
    ),
}


def parse_args(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--general", help="general corpus (.txt/.md with blank-line-separated documents, or .jsonl)")
    p.add_argument("--domain", help="domain corpus, same formats")
    p.add_argument("--out", required=True, help="output directory (the pretrained base is cached here)")
    p.add_argument(
        "--model",
        help="real-model profile: a pretrained Hugging Face directory, or an importable "
        "model's name (smollm2_135m); fine-tuned as it is, no base pretraining",
    )
    p.add_argument("--steps", type=int, help="fine-tuning steps per setting (tiny 200, real 20)")
    p.add_argument("--base-steps", type=int, default=600, help="pretraining steps of the tiny base")
    p.add_argument("--lr", type=float, help="fine-tuning peak learning rate (tiny 1e-3, real 1e-4)")
    p.add_argument("--base-lr", type=float, default=1e-3, help="pretraining peak learning rate")
    p.add_argument("--warmup", type=int, help="warmup steps (tiny 10, real 2)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--micro-batch", type=int, help="packed rows per rank per step (tiny 4, real 1)")
    p.add_argument("--max-docs", type=int, default=20000, help="documents kept per corpus (seeded sample)")
    p.add_argument("--heldout-docs", type=int, help="held-out documents per corpus (tiny 500, real 200)")
    p.add_argument("--lams", type=_floats, help="EWC λ sweep, comma-separated")
    p.add_argument("--replay-ratios", type=_floats, help="replay ratios, comma-separated")
    p.add_argument("--ewc-replay-lam", type=float, default=None, help="λ of ewc_replay (default: the smallest --lams)")
    p.add_argument("--ewc-replay-ratio", type=float)
    p.add_argument("--lower-lrs", type=_floats, help="plain fine-tuning at these lower peak LRs too (real: 2.5e-5)")
    p.add_argument(
        "--warmups",
        type=lambda t: [int(x) for x in t.split(",") if x.strip()],
        help="plain fine-tuning re-warmed over these numbers of steps too (0 = no warmup)",
    )
    p.add_argument(
        "--fisher-labels",
        type=lambda t: [x for x in t.split(",") if x.strip()],
        help="EWC's Fisher labels, each run at every --lams: data (the empirical Fisher), sampled (the "
        "model's own predictions); e.g. data,sampled",
    )
    p.add_argument(
        "--chat-replay-ratios",
        type=_floats,
        help="real: replay the base's own answers to general prompts (rehearsal) at these ratios",
    )
    p.add_argument(
        "--chat-ewc-replay-ratio",
        type=float,
        help="real: ewc_replay on the rehearsal: chat replay at this ratio, EWC (--ewc-replay-lam, the "
        "first --fisher-labels) with its Fisher on the same chats' answers",
    )
    p.add_argument("--rehearsal-prompts", type=int, default=64, help="real: rehearsal prompts to answer")
    p.add_argument("--rehearsal-tokens", type=int, default=128, help="real: longest rehearsal answer kept")
    p.add_argument(
        "--rehearsal-keep-cut-off",
        action="store_true",
        help="real: keep rehearsal answers cut off at --rehearsal-tokens (default: dropped)",
    )
    p.add_argument("--alphas", type=_floats, help="real: interpolation α with the start, scored for every fine-tune")
    p.add_argument(
        "--group-alphas",
        type=_floats,
        help="real: per-group α grid (bottom/middle/top each from these values) scored for `none`",
    )
    p.add_argument("--probe-tokens", type=int, default=3000, help="real: tokens of general and of domain text scored")
    p.add_argument("--answer-tokens", type=int, default=64, help="real: longest base answer generated per prompt")
    p.add_argument("--prompts", type=int, help="real: how many of the chat prompts (default: all 24)")
    p.add_argument("--top-k", type=int, default=64, help="real: the base's next-token probabilities kept for the KL")
    p.add_argument("--keep-runs", action="store_true", help="real: keep each fine-tune's checkpoint and export")
    p.add_argument("--fisher-batches", type=int, help="reference micro-batches for the Fisher")
    p.add_argument(
        "--only",
        type=lambda s: s.split(","),
        help="what to run besides none (the reference, always run): replay, ewc, ewc_replay, distill, freeze, "
        "lines, mft, combined (mft + distill); e.g. --only ewc. Tiny: all but combined; real: replay, distill, "
        "mft, combined",
    )
    p.add_argument(
        "--tasks",
        type=lambda t: [x for x in t.split(",") if x],
        default=["fullft_general", "fullft_computing"],
        help="real: lm-eval tasks scored on plain prompts for the base and each export at α=1 ('' = none)",
    )
    p.add_argument(
        "--chat-tasks",
        type=lambda t: [x for x in t.split(",") if x],
        default=["fullft_ifeval"],
        help="real: lm-eval tasks scored through the chat template ('' = none)",
    )
    p.add_argument("--task-limit", type=int, help="real: at most this many items a task (default: all)")
    p.add_argument("--distill-weights", type=_floats, help="regularizer.distill.weight values (λ of the KL term)")
    p.add_argument("--distill-rows", type=int, help="distillation rows per step (regularizer.distill.rows)")
    p.add_argument("--mft-taus", type=_floats, help="regularizer.mft.tau values (corrective targets, τ of the label)")
    p.add_argument(
        "--freeze-blocks",
        type=lambda t: [int(x) for x in t.split(",") if x.strip()],
        help="regularizer.freeze.first_blocks values",
    )
    p.add_argument("--lines-betas", type=_floats, help="tiny: plain fine-tuning swept with LiNeS's β (each α + β <= 1)")
    p.add_argument("--skip-steps", type=int, help="first steps left out of the step-time median")
    p.add_argument(
        "--launcher",
        choices=("python", "deepspeed"),
        default="python",
        help="python: one rank; deepspeed: --nproc ZeRO-3 ranks",
    )
    p.add_argument("--nproc", type=int, default=2, help="ranks with --launcher deepspeed")
    p.add_argument("--seed", type=int, default=1234, help="data split, probe, rehearsal and (by default) training")
    p.add_argument(
        "--train-seed",
        type=int,
        help="trainer.seed of the fine-tunes only (their data order): another seed on the same data, probe and "
        "rehearsal (default: --seed)",
    )
    p.add_argument("--smoke", action="store_true", help="bundled sample data, a few steps (seconds to a minute)")
    args = p.parse_args(argv)
    given = {k for k, v in vars(args).items() if v is not None and v != p.get_default(k)}
    profile = dict(PROFILES["real" if args.model else "tiny"])
    if args.smoke:
        profile.update(PROFILES["real_smoke" if args.model else "smoke"])
        args.general = args.general or str(BUNDLED / "general_text.txt")
        args.domain = args.domain or str(BUNDLED / "medical_notes.txt")
    for k, v in profile.items():
        if k not in given:
            setattr(args, k, v)
    if not (args.general and args.domain):
        p.error("--general and --domain are required (or --smoke)")
    if args.ewc_replay_lam is None:
        args.ewc_replay_lam = min(args.lams)
    if args.train_seed is None:
        args.train_seed = args.seed
    return args


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    if args.model:
        return real_main(args)
    out = Path(args.out).resolve()
    started, commit = time.perf_counter(), git_head()  # the code the runs start from
    data = {
        name: split_corpus(Path(path).resolve(), name, out / "data", args.max_docs, args.heldout_docs, args.seed)
        for name, path in (("general", args.general), ("domain", args.domain))
    }
    for name, d in data.items():
        print(
            f"{name}: {d['source']} -> {d['train_docs']:,} train / {d['heldout_docs']:,} held-out documents "
            f"({d['train_mib']} MiB train)",
            flush=True,
        )

    base = out / f"base-{base_key(args, data)}"
    if (base / "hf" / "config.json").is_file():
        print(f"base: reusing {base}", flush=True)
        base_wall = None
    else:
        print(f"base: pretraining {args.base_steps} steps on the general corpus -> {base}", flush=True)
        base_wall = train(args, base_overrides(args, data, base), out / "logs" / "base.log")
    base_rows = read_metrics(base)
    base_general = series(base_rows, "eval/general/loss")
    base_domain = series(base_rows, "eval/domain/loss")

    results = []
    for s in settings(args):
        run_dir = out / "runs" / s.dirname
        shutil.rmtree(run_dir, ignore_errors=True)  # every fine-tune is measured fresh
        print(f"fine-tune {s.name}: {args.steps} steps -> {run_dir}", flush=True)
        wall = train(args, finetune_overrides(args, data, base, s, run_dir), out / "logs" / f"{run_dir.name}.log")
        interp = run_dir / "interpolation.json"
        method, knob = method_of(s)
        results.append(
            {
                "setting": s.name,
                "regularizer": s.regularizer,
                "overrides": s.overrides,
                "method": method,
                "knob": knob,
                "output_dir": str(run_dir),
                "wall_s": round(wall, 1),
                **summarise(read_metrics(run_dir), args.skip_steps),
                "interpolation": json.loads(interp.read_text()) if interp.is_file() else None,
            }
        )
        shutil.rmtree(run_dir / "hf", ignore_errors=True)  # the export was only the sweep's output
    relative(results)
    summary = verdict(results)
    points = tiny_points(results)
    fronts = frontier.frontiers(points)
    png = frontier.plot(
        points,
        out / "frontier.png",
        f"tiny base, {args.steps} steps on {Path(args.domain).name}",
        TARGET_REMOVED,
        TARGET_KEPT,
    )

    ranks = 1 if args.launcher == "python" else args.nproc
    launch = (
        "python launch/train.py (1 rank)" if ranks == 1 else f"deepspeed --num_gpus {ranks} (ZeRO-3, {ranks} ranks)"
    )
    print()
    print(
        f"Forgetting: {args.steps} fine-tuning steps on {Path(args.domain).name} from a base pretrained "
        f"{args.base_steps} steps on {Path(args.general).name}; launcher: {launch}"
    )
    print(
        f"base model: general held-out loss {base_general[0]:.3f} -> {base_general[max(base_general)]:.3f}, "
        f"domain {base_domain[0]:.3f} -> {base_domain[max(base_domain)]:.3f} over pretraining"
    )
    print(table(results))
    print(
        f"target: best setting removes >= {TARGET_REMOVED:.0%} of the forgetting and keeps >= {TARGET_KEPT:.0%} "
        "of the gain: "
        + (f"met by {', '.join(summary['settings_meeting_target'])}" if summary["forgetting_target_met"] else "NOT met")
        + f" (best: {summary['best_setting']})"
    )
    yes = {True: "met", False: "NOT met", None: "no EWC run"}
    print(
        f"target: EWC costs <= {TARGET_EWC_COST:.0%} of a step: {yes[summary['ewc_cost_target_met']]} by EWC's own "
        "time "
        f"(max {_pct(summary['ewc_extra_unphased_vs_none_max'], True)}), "
        f"{yes[summary['ewc_step_time_target_met_raw']]} by the whole step's median "
        f"(max {_pct(summary['ewc_step_time_vs_none_max'], True)})"
    )
    print("\nPareto frontiers (forgetting removed / gain kept over each method's knob):")
    for method, front in sorted(fronts.items()):
        print(f"  {method}: " + ", ".join(f"{p['knob']} {_pct(p['removed'])}/{_pct(p['kept'])}" for p in front))
    print(f"frontiers: {png}")
    if not summary["none_forgets"]:
        print(
            "warning: plain fine-tuning did not forget (general loss did not rise); pretrain the base longer "
            "(--base-steps) or fine-tune longer / with a higher --lr"
        )

    report = {
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "machine": machine_line(),
        "launcher": launch,
        "ranks": ranks,
        "args": {k: v for k, v in vars(args).items()},
        "data": data,
        "base": {
            "output_dir": str(base),
            "wall_s": base_wall,
            "general_loss": base_general,
            "domain_loss": base_domain,
        },
        "results": results,
        "summary": summary,
        "table": table(results),
        "points": points,
        "frontiers": fronts,
        "total_wall_s": round(time.perf_counter() - started, 1),
    }
    (out / "forgetting.json").write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str))
    print(f"wrote {out / 'forgetting.json'}")
    return report


if __name__ == "__main__":
    main()
