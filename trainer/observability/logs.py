"""The console log of every rank: rank 0 says what happens, the others only warn and fail."""

from __future__ import annotations

import logging
import warnings


def setup_logging(rank: int) -> None:
    """Rank 0 logs INFO; other ranks only warnings and errors (no per-rank spam)."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level, format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S", force=True
    )
    # DeepSpeed calls torch collectives that torch has renamed; the warning repeats every step.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use .*", category=FutureWarning)
    logging.getLogger("trainer.ranks").setLevel(logging.INFO)  # the few lines every rank must say
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
