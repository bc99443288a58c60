"""Where things live on disk: the cache shared by runs, and the layout of a run's output_dir.

    $FULLFT_CACHE (default ~/.cache/fullft)
        data/          prepared sources (data_pipeline/prepare.py), unless data.cache_dir says otherwise
        tokenizers/    sentencepiece tokenizers trained for random-init models
        models/        GGUF checkpoints imported as Hugging Face directories
        isolation/     the packed-attention isolation probe's verdicts, per model type and attention

    output_dir/
        config.yaml  metrics.jsonl  samples.jsonl  dashboard.png  interpolation.json
        checkpoints/   sharded checkpoints and `latest` (trainer/checkpointing/checkpoint.py)
        hf/            the Hugging Face export (trainer/checkpointing/export.py)
        wandb/         the W&B run

A leaf: it imports nothing of the project.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache every run on this machine shares: $FULLFT_CACHE, else ~/.cache/fullft."""
    return Path(os.environ.get("FULLFT_CACHE", Path.home() / ".cache" / "fullft"))


def checkpoints_dir(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def export_dir(output_dir: str) -> Path:
    return Path(output_dir) / "hf"


def config_file(output_dir: str) -> Path:
    return Path(output_dir) / "config.yaml"
