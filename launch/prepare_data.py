"""Prepare the data of a run ahead of time: `python launch/prepare_data.py +exp=medical [overrides]`.

Tokenizes and packs every training source and eval set into the data cache (memory-mapped rows +
manifest) exactly as training would; a later `launch/train.py` with the same overrides maps the
result instead of tokenizing again. Prints each manifest's counts and packing efficiency.

    python launch/prepare_data.py --shard I/N [overrides]

tokenizes only task I's share (of N) of every source's units (data_pipeline/prepare.py) and packs
nothing: the N tasks run anywhere that sees data.cache_dir (a Slurm array: slurm/prepare.sh), then
one run without --shard packs the units into rows and writes the manifests. A task reruns alone;
units already tokenized are kept.
"""

import json
import logging
import sys

import hydra
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from trainer.cli import CONF_DIR, preflight, to_config, upgrade_overrides
from trainer.distributed import strip_launcher_args


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    config = to_config(cfg)
    shard = SHARD
    from trainer.data import prepare_data
    from trainer.engine.tokenizer import load_tokenizer
    from trainer.recipe import stage_overrides

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    stages = [("", config)]
    if config.recipe:  # every stage of a recipe
        overrides = list(HydraConfig.get().overrides.task)
        stages = stage_overrides(
            config, lambda o: to_config(compose(config_name="config", overrides=upgrade_overrides(o))), overrides
        )
    # Later stages start from an earlier stage's export, which carries the first stage's tokenizer.
    tokenizer = load_tokenizer(stages[0][1].model)
    for stage, staged in stages:
        data = prepare_data(staged, tokenizer, preparer=True, progress=True, shard=shard)
        if data is None:  # a --shard task: units tokenized, nothing packed
            continue
        for name, prepared in [*zip(data.names, data.sources), *data.eval_sets.items()]:
            print(f"{stage + ': ' if stage else ''}{name}: {prepared.directory}\n  {json.dumps(prepared.stats)}")


SHARD = None


def take_shard(argv):
    """`--shard I/N` (or `--shard=I/N`) out of the arguments: (I, N), and the rest."""
    rest, shard = [], None
    args = iter(argv)
    for a in args:
        if a == "--shard" or a.startswith("--shard="):
            value = a.split("=", 1)[1] if "=" in a else next(args, "")
            i, _, n = value.partition("/")
            if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
                raise SystemExit(f"--shard {value!r}: expected I/N with 0 <= I < N (e.g. --shard 0/8)")
            shard = (int(i), int(n))
        else:
            rest.append(a)
    return shard, rest


if __name__ == "__main__":
    SHARD, args = take_shard(strip_launcher_args(sys.argv)[1:])
    sys.argv = sys.argv[:1] + preflight(args)
    main()
