"""Forgetting Pareto frontiers: for each method, the points over its knob (replay ratio, EWC λ,
interpolation α, ...) that no other point of the same method beats on both axes, drawn as one PNG.

A point is (removed, kept): the share of plain fine-tuning's forgetting removed and the share of its
domain gain kept (bench/forgetting.py). Higher is better on both; the target corner is
removed >= 0.90 and kept >= 0.95.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Sequence


def pareto(points: Sequence[Dict], x: str = "removed", y: str = "kept") -> List[Dict]:
    """The points not dominated by another (>= on both axes, > on one), sorted by x. Points missing
    either value are left out."""
    pts = [p for p in points if p.get(x) is not None and p.get(y) is not None]
    front = [p for p in pts if not any(q[x] >= p[x] and q[y] >= p[y] and (q[x] > p[x] or q[y] > p[y]) for q in pts)]
    return sorted(front, key=lambda p: (p[x], -p[y]))


def frontiers(points: Sequence[Dict], key: str = "method") -> Dict[str, List[Dict]]:
    """Each method's own frontier (points grouped by `key`)."""
    methods: Dict[str, List[Dict]] = {}
    for p in points:
        methods.setdefault(p[key], []).append(p)
    return {m: pareto(ps) for m, ps in methods.items()}


def best_trade_off(points: Sequence[Dict], removed_target: float, kept_target: float) -> Optional[Dict]:
    """The point meeting both targets with the most forgetting removed; else the one closest to the
    target corner (the largest min(removed/target, kept/target)) among the undominated points."""
    pts = [p for p in points if p.get("removed") is not None and p.get("kept") is not None]
    meeting = [p for p in pts if p["removed"] >= removed_target and p["kept"] >= kept_target]
    if meeting:
        return max(meeting, key=lambda p: (p["removed"], p["kept"]))
    return max(pareto(pts), key=lambda p: min(p["removed"] / removed_target, p["kept"] / kept_target), default=None)


def plot(points: Sequence[Dict], path: Path, title: str, removed_target: float, kept_target: float) -> Path:
    """Every point (faint) and each method's frontier (a line), the target corner shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6), dpi=110)
    ax.axvspan(removed_target, 1.05, ymin=0, ymax=1, alpha=0)  # keeps the corner inside the axes
    ax.fill_between(
        [removed_target, 1.05],
        kept_target,
        1.1,
        color="tab:green",
        alpha=0.12,
        label=f"target: removed ≥ {removed_target:.0%}, kept ≥ {kept_target:.0%}",
    )
    palette = plt.get_cmap("tab20").colors  # 20 distinct colours: a sweep has a dozen methods
    for i, (method, front) in enumerate(sorted(frontiers(points).items())):
        colour = palette[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20]
        mine = [
            p for p in points if p["method"] == method and p.get("removed") is not None and p.get("kept") is not None
        ]
        ax.scatter([p["removed"] for p in mine], [p["kept"] for p in mine], color=colour, alpha=0.3, s=18)
        ax.plot([p["removed"] for p in front], [p["kept"] for p in front], "o-", color=colour, label=method, ms=5)
        for p in front:
            ax.annotate(
                p["knob"],
                (p["removed"], p["kept"]),
                fontsize=7,
                color=colour,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xlabel("share of plain fine-tuning's forgetting removed")
    ax.set_ylabel("share of plain fine-tuning's domain gain kept")
    xs = [p["removed"] for p in points if p.get("removed") is not None] + [0.0, 1.0]
    ys = [p["kept"] for p in points if p.get("kept") is not None] + [0.0, 1.0]
    ax.set_xlim(min(min(xs), 0) - 0.05, max(max(xs), 1) + 0.05)
    ax.set_ylim(min(min(ys), 0) - 0.05, max(max(ys), 1) + 0.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("\n".join(textwrap.wrap(title, 110)), fontsize=9)  # a long title wraps instead of running off
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
