"""Chained recipes: several training stages in one job, each starting from the previous one's result.

An experiment lists its stages under `recipe:` (see conf/exp/medical.yaml); each stage is the run's
own config plus the stage's overrides, trained into output_dir/<stage name>. Stage k+1 starts from
stage k's Hugging Face export, carries its EWC Fisher (online EWC, when both use EWC) and measures
eval/forgetting against the model the first real stage started from (a `random_init_only` stage
only makes a base for the tiny demo model; it is not the reference). A rerun skips finished stages and resumes the
unfinished one, so a preempted multi-stage job needs nothing but the same command again.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, List

from trainer.config import Config

log = logging.getLogger("trainer")


def stage_overrides(cfg: Config, compose: Callable[[List[str]], Config], user_overrides: List[str]) -> List[tuple]:
    """(name, composed Config) for every stage that runs, with the chaining overrides applied."""
    plan: List[tuple] = []
    reference_dir = None  # the first stage on the model the user brings: forgetting is measured from it
    # Precedence, lowest first: the stage's own overrides, the model's for that stage
    # (model.stage_overrides), the command line; output_dir is derived from the run's.
    user = [o for o in user_overrides if not o.lstrip("+~").startswith("output_dir=")]
    for stage in cfg.recipe:
        out = str(Path(cfg.output_dir) / stage.name)
        extra = [f"output_dir={out}", "recipe=[]"]
        own = list(stage.overrides) + list(cfg.model.stage_overrides.get(stage.name, []))
        staged = compose(own + user + extra)
        if stage.random_init_only and staged.model.name_or_path:
            log.info("recipe: skipping stage %s (only for a random-init model; model.name_or_path is set)", stage.name)
            continue
        if plan:
            previous = plan[-1][1]
            extra.append(f"model.name_or_path={previous.output_dir}/hf")
            if staged.regularizer.uses_ewc and previous.regularizer.uses_ewc:
                extra.append(f"regularizer.ewc.previous={previous.output_dir}")
            if reference_dir is not None:
                extra.append(f"eval.baseline_from={reference_dir}")
            staged = compose(own + user + extra)
        if reference_dir is None and not stage.random_init_only:
            reference_dir = out
        plan.append((stage.name, staged))
    return plan


def run(cfg: Config, compose: Callable[[List[str]], Config], user_overrides: List[str], fit: Callable):
    """Train `cfg`: one fit, or each stage of its recipe in order. Returns the last fit's Outcome;
    a stage that stopped early (preemption, max_time) ends the recipe there, and the same command
    resumes it."""
    if not cfg.recipe:
        return fit(cfg)
    from trainer import distributed
    from trainer.loop import Outcome

    plan = stage_overrides(cfg, compose, user_overrides)
    outcome = None
    with distributed.held():  # one process group for every stage
        for i, (name, staged) in enumerate(plan):
            log.info("recipe %s: stage %d/%d %s -> %s", cfg.exp_name, i + 1, len(plan), name, staged.output_dir)
            outcome = fit(staged)
            if outcome is Outcome.STOPPED:
                return outcome
        if _is_rank0():
            _link_final_stage(Path(cfg.output_dir), Path(plan[-1][1].output_dir))
    return outcome


def _is_rank0() -> bool:
    import torch.distributed as dist

    from trainer.distributed import env_rank

    # No process group when every stage was already complete (nothing was built): the launcher's rank.
    return dist.get_rank() == 0 if dist.is_initialized() else env_rank() == 0


def _link_final_stage(output_dir: Path, last: Path) -> None:
    """output_dir/{hf,config.yaml,metrics.jsonl,checkpoints,wandb} point at the last stage's, so the
    recipe's result sits where a single run's would (output_dir/hf is the final model)."""
    for name in ("hf", "config.yaml", "metrics.jsonl", "checkpoints", "wandb"):
        link, target = output_dir / name, last / name
        if not target.exists():
            continue
        if link.is_symlink():
            link.unlink()
        elif link.exists():
            log.warning("recipe: %s exists and is not a link; the final stage's %s stays in %s", link, name, last)
            continue
        link.symlink_to(Path(last.name) / name)
    log.info("recipe: final model in %s (-> %s)", output_dir / "hf", last / "hf")
