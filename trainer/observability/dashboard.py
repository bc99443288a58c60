"""The PNG dashboard of a run, drawn from its metrics.jsonl: for runs without W&B (or before
`wandb sync`). The trainer draws output_dir/dashboard.png at the end of every run; `launch/plot.py
OUTPUT_DIR` draws it for any run, finished or not.

Panels, 3 x 3 in reading order (PANELS): training loss (per source, the regularisers' penalties), eval loss per
set, Δ eval loss (each set's eval loss minus its first value: a general set's rise is forgetting, a
domain set's fall is gain; and eval/forgetting; see delta_labels), learning rate,
gradient norm, throughput (and MFU), peak memory per rank, packing, step-time breakdown; a
preference stage adds a row (PREFERENCE_PANELS): rewards, reward accuracy, log-probs; a run with
eval.harness one more (HARNESS_PANELS): the lm-eval task scores and their change since the start. A panel
with nothing to show says "no data".
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Tuple

PANELS = (
    "loss",
    "eval loss",
    "Δ eval loss",
    "learning rate",
    "grad norm",
    "throughput",
    "peak memory (GB)",
    "packing",
    "step time (s)",
)
PREFERENCE_PANELS = ("rewards", "reward accuracy", "log-probs")
"""A fourth row for preference stages (stage=dpo): TRL's rewards/*, logps/*, train and eval/<set>/."""
HARNESS_PANELS = ("task scores (lm-eval)", "Δ task scores since the first eval")
"""A row when eval.harness ran: eval/harness/<task>/<metric> (standard errors left out), and each
one's change since its first value (the stage's start)."""
COLUMNS = 3
Series = Tuple[List[int], List[float]]


def line(rows: List[Dict], key: str) -> Series:
    """(steps, values) of one metric, one value per step (the last logged)."""
    by_step = {r["step"]: r[key] for r in rows if key in r and r[key] is not None}
    steps = sorted(by_step)
    return steps, [float(by_step[s]) for s in steps]


def keys_like(rows: List[Dict], pattern: str) -> List[str]:
    regex = re.compile(pattern)
    return sorted({k for r in rows for k in r if regex.fullmatch(k)})


def delta_labels(rows: List[Dict]) -> Tuple[str, Dict[str, str]]:
    """The Δ eval loss panel's title, and the legend label of each metric it draws. Eval sets are
    named by role (evaluate.forgetting_metrics): `general*` sets measure forgetting (their loss rising
    is the model forgetting), `domain*` sets the stage's gain (their loss falling is learning); other
    sets (a dpo stage's pairs) are plain Δ. The title names forgetting only when a general set is drawn:
    a stage with only a domain set shows gain alone."""
    labels, roles = {}, []
    for key in keys_like(rows, r"eval/[^/]+/loss"):
        name = key.split("/")[1]
        if name.startswith("general"):
            labels[key] = f"{name}: forgetting (Δ loss > 0 = forgot)"
            roles.append("forgetting (general)")
        elif name.startswith("domain"):
            labels[key] = f"{name}: gain (Δ loss < 0 = learned)"
            roles.append("gain (domain)")
        else:
            labels[key] = f"{name}: Δ loss"
    if line(rows, "eval/forgetting")[0]:
        labels["eval/forgetting"] = "eval/forgetting (general, vs the base model)"
        roles.append("forgetting (general)")
    roles = sorted(set(roles), key=["forgetting (general)", "gain (domain)"].index)
    return "Δ eval loss since the first eval" + ("\n" + " and ".join(roles) if roles else ""), labels


def render(rows: List[Dict], out: Path, title: str = "") -> Path:
    """Draw the dashboard of `rows` (metrics.jsonl) to the PNG `out`."""
    fig = figure(rows, title)  # selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def figure(rows: List[Dict], title: str = ""):
    """The dashboard as a matplotlib Figure (render saves it); the caller closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = PANELS + (PREFERENCE_PANELS if keys_like(rows, r"(eval/[^/]+/)?rewards/.+") else ())
    tasks = [k for k in keys_like(rows, r"eval/harness/.+") if not k.endswith("_stderr")]
    names += HARNESS_PANELS if tasks else ()
    height = -(-len(names) // COLUMNS)
    fig, axes = plt.subplots(
        height, COLUMNS, figsize=(15, 11 * height * COLUMNS / len(PANELS)), constrained_layout=True
    )
    panels = dict(zip(names, axes.flat))
    for ax in list(axes.flat)[len(names) :]:  # a row's unused places
        ax.axis("off")

    def draw(panel: str, keys: List[str], label=lambda k: k, offset_first: bool = False, ax=None, **style) -> int:
        ax = ax or panels[panel]
        drawn = 0
        for key in keys:
            steps, values = line(rows, key)
            if not steps:
                continue
            if offset_first:  # change since the first value (the base model's, when eval.at_start)
                values = [v - values[0] for v in values]
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=label(key), **style)
            drawn += 1
        return drawn

    draw("loss", ["train/loss"] + keys_like(rows, r"train/.+/loss"))
    draw("loss", keys_like(rows, r"reg/.+_penalty"), linestyle="--")  # EWC, distillation
    draw("eval loss", keys_like(rows, r"eval/[^/]+/loss"))
    delta_title, delta_label = delta_labels(rows)
    draw("Δ eval loss", keys_like(rows, r"eval/[^/]+/loss"), label=delta_label.get, offset_first=True)
    draw("Δ eval loss", ["eval/forgetting"], label=delta_label.get, linestyle="--")
    draw("learning rate", ["train/lr"])
    draw("grad norm", ["train/grad_norm"])
    draw("throughput", ["perf/tokens_per_s"])
    if line(rows, "perf/mfu")[0]:
        draw("throughput", ["perf/mfu"], ax=panels["throughput"].twinx(), color="tab:red", linestyle="--")
    if not draw("peak memory (GB)", keys_like(rows, r"perf/rank\d+/peak_mem_gb")):
        draw("peak memory (GB)", ["perf/peak_mem_gb"])
    draw("packing", ["data/packing_efficiency", "data/supervised_token_fraction", "data/replay_token_fraction"])
    draw("step time (s)", ["perf/step_time_s", "perf/data_wait_s", "perf/forward_backward_s", "perf/optimizer_s"])
    if "rewards" in panels:  # healthy: chosen up or flat, rejected down, margins and accuracy rising
        draw("rewards", keys_like(rows, r"(eval/[^/]+/)?rewards/(chosen|rejected|margins)"))
        draw("reward accuracy", keys_like(rows, r"(eval/[^/]+/)?rewards/accuracies"))
        draw("log-probs", keys_like(rows, r"(eval/[^/]+/)?logps/(chosen|rejected)"))

    if tasks:
        draw(HARNESS_PANELS[0], tasks, label=lambda k: k.removeprefix("eval/harness/"))
        draw(HARNESS_PANELS[1], tasks, label=lambda k: k.removeprefix("eval/harness/"), offset_first=True)

    for name, ax in panels.items():
        ax.set_title(delta_title if name == "Δ eval loss" else name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.4")
    fig.suptitle(title)
    return fig
