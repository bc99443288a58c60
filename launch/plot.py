"""Draw a run's PNG dashboard from its metrics.jsonl (trainer/observability/dashboard.py has the panels).

python launch/plot.py OUTPUT_DIR [-o dashboard.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer.observability.dashboard import render
from trainer.observability.tracking import read_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="a run's output_dir (holds metrics.jsonl)")
    parser.add_argument("-o", "--out", type=Path, help="PNG path (default: OUTPUT_DIR/dashboard.png)")
    args = parser.parse_args()
    metrics = args.output_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise SystemExit(f"{metrics}: not found (is {args.output_dir} a run's output_dir?)")
    rows = read_metrics(metrics)
    last = max((r["step"] for r in rows), default=0)
    title = f"{args.output_dir.resolve().name} — step {last}"
    print(render(rows, args.out or args.output_dir / "dashboard.png", title))


if __name__ == "__main__":
    main()
