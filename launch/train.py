"""Train: `deepspeed launch/train.py +exp=medical [overrides]`.

Works the same under `deepspeed` (which adds --local_rank=N), `torchrun`, `srun` (SLURM_PROCID...)
and plain `python` (world size 1). `--cfg job` prints the composed config and trains nothing.
Exit status: 0 when the run finished or stopped early with a checkpoint (preemption, max_time: the
same command, or Slurm's requeue, resumes), 1 on an error (its traceback is printed here). The
process ends through trainer.distributed.finish: flushed, without interpreter finalisation, where
gloo's worker threads could abort a run that trained and exported.
"""

import sys
import traceback

import hydra
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from trainer import distributed
from trainer.cli import CONF_DIR, preflight, to_config, upgrade_overrides
from trainer.distributed import strip_launcher_args


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    config = to_config(cfg)
    from trainer import recipe
    from trainer.loop import fit  # heavy imports (torch, deepspeed) only once the config is valid

    # A recipe (several chained stages) composes each stage from the same overrides plus its own.
    overrides = list(HydraConfig.get().overrides.task)
    stage = lambda extra: to_config(compose(config_name="config", overrides=upgrade_overrides(extra)))  # noqa: E731
    try:
        recipe.run(config, stage, overrides, fit)
    except Exception:  # reported here: Hydra's own report prints every override, secrets included
        traceback.print_exc()
        raise SystemExit(1) from None


if __name__ == "__main__":
    sys.argv = sys.argv[:1] + preflight(strip_launcher_args(sys.argv)[1:])
    try:
        main()
        status = 0
    except SystemExit as ex:  # ours (1 on an error) or Hydra's (--help, a bad override)
        status = ex.code if isinstance(ex.code, int) else int(ex.code is not None)
        if not isinstance(ex.code, (int, type(None))):
            print(ex.code, file=sys.stderr)
    distributed.finish(status)
