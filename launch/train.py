"""Train: `deepspeed launch/train.py +exp=medical [overrides]`.

Works the same under `deepspeed` (which adds --local_rank=N), `torchrun`, `srun` (SLURM_PROCID...)
and plain `python` (world size 1). `--cfg job` prints the composed config and trains nothing.
"""

import sys
import traceback
from pathlib import Path

import hydra
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from trainer.config import check_overrides, register_configs, to_config
from trainer.distributed import strip_launcher_args

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    config = to_config(cfg)
    from trainer import recipe
    from trainer.loop import fit  # heavy imports (torch, deepspeed) only once the config is valid

    # A recipe (several chained stages) composes each stage from the same overrides plus its own.
    overrides = list(HydraConfig.get().overrides.task)
    try:
        recipe.run(config, lambda extra: to_config(compose(config_name="config", overrides=extra)), overrides, fit)
    except Exception:  # reported here: Hydra's own report prints every override, secrets included
        traceback.print_exc()
        raise SystemExit(1) from None


if __name__ == "__main__":
    sys.argv = strip_launcher_args(sys.argv)
    register_configs()
    check_overrides(CONF_DIR, sys.argv[1:])
    main()
