"""Metrics: one JSON line per event in output_dir/metrics.jsonl and, with logger=wandb, a W&B run.

Only rank 0 writes. The W&B run id is stored in output_dir, so a resumed or requeued job continues
the same run. On resume from step S, lines after S (logged after the checkpoint the job resumed
from) are dropped from metrics.jsonl, since the steps are about to be trained again: the file
never has a gap or a duplicate.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Dict

from trainer.config import LoggerConfig

log = logging.getLogger("trainer")


class Tracker:
    def __init__(self, cfg: LoggerConfig, output_dir: str, exp_name: str, config_tree: Dict[str, Any],
                 resume_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.run = None
        if not enabled:
            return
        self.path = Path(output_dir) / "metrics.jsonl"
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = open(self.path, "a", buffering=1)
        if cfg.backend == "wandb":
            self.run = _start_wandb(cfg, output_dir, exp_name, config_tree)

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.run is not None:
            self.run.finish()


def _start_wandb(cfg: LoggerConfig, output_dir: str, exp_name: str, config_tree: Dict[str, Any]):
    import wandb

    mode = cfg.mode or os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    id_file = Path(output_dir) / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group or exp_name,
                     name=cfg.name or Path(output_dir).name, tags=cfg.tags, config=config_tree, dir=output_dir,
                     id=run_id, resume="allow", mode=mode, job_type="train")
    log.info("W&B run %s (%s) in %s", run_id, mode, Path(output_dir) / "wandb")
    return run
