"""The DeepSpeed config: the only raw dict in the project, built from the typed config.

Batch sizes are consistent by construction (train_batch_size = micro x accumulation x world). A
user JSON (`deepspeed.config_file`) may add keys the typed config does not cover (e.g. comms
logging, aio); a key that contradicts the trainer config is an error naming both values.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Tuple

from trainer.config import DeepSpeedConfig, TrainerConfig


def use_bf16(trainer: TrainerConfig, on_gpu: bool) -> bool:
    """bf16 on GPUs by default; fp32 on CPU (CPU bf16 matmuls are slow and gloo reduces fp32)."""
    return trainer.precision == "bf16" or (trainer.precision == "auto" and on_gpu)


def build_deepspeed_config(
    ds: DeepSpeedConfig, trainer: TrainerConfig, world_size: int, on_gpu: bool, extra_micro_batches: int = 0
) -> Dict[str, Any]:
    """ZeRO-3 config for `deepspeed.initialize` and `deepspeed.zero.Init`. trainer.grad_accum_steps
    is normally settled by the trainer first (trainer/checkpointing/reshard.py); unset, it is derived here as for a
    fresh run. `extra_micro_batches`: micro-batches a step adds to the stage's own (regularizer.distill's
    one), so that DeepSpeed's accumulation boundary falls on the step's last backward."""
    from trainer.checkpointing.reshard import resolve_batch

    accum = resolve_batch(
        trainer.micro_batch_size, trainer.grad_accum_steps, trainer.global_batch_size, world_size, None
    )
    zero: Dict[str, Any] = {
        "stage": 3,
        "overlap_comm": ds.overlap_comm and on_gpu,
        "contiguous_gradients": True,
        "reduce_bucket_size": ds.reduce_bucket_size,
        "stage3_prefetch_bucket_size": ds.prefetch_bucket_size,
        "stage3_param_persistence_threshold": ds.param_persistence_threshold,
        # Export gathers 16-bit weights collectively; keep DeepSpeed from doing it on every save.
        "stage3_gather_16bit_weights_on_model_save": False,
    }
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": str(ds.offload_optimizer), "pin_memory": on_gpu}
    if ds.offload_param != "none":
        zero["offload_param"] = {"device": str(ds.offload_param), "pin_memory": on_gpu}
    config: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": trainer.micro_batch_size,
        "gradient_accumulation_steps": accum + extra_micro_batches,
        "train_batch_size": trainer.micro_batch_size * (accum + extra_micro_batches) * world_size,
        "gradient_clipping": trainer.optim.grad_clip,
        "bf16": {"enabled": use_bf16(trainer, on_gpu)},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # the trainer logs; DeepSpeed's own step prints are noise
        "wall_clock_breakdown": False,
    }
    if ds.config_file:
        with open(ds.config_file) as f:
            try:
                user = json.load(f)
            except json.JSONDecodeError as ex:
                raise ValueError(f"{ds.config_file}:{ex.lineno}: not valid JSON ({ex.msg})") from None
        config = merge_user_config(config, user, source=ds.config_file)
    return config


# Keys the trainer owns, and the override that sets each.
_OWNED = {
    "train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
    "gradient_accumulation_steps": "trainer.grad_accum_steps (or trainer.global_batch_size)",
    "train_batch_size": "trainer.global_batch_size, or trainer.micro_batch_size x trainer.grad_accum_steps x world "
    "size",
    "gradient_clipping": "trainer.optim.grad_clip",
    "bf16.enabled": "trainer.precision",
    "fp16.enabled": "trainer.precision (fp16 is not supported; use bf16)",
    "zero_optimization.stage": "nothing: this trainer is ZeRO-3 only",
    "optimizer": "trainer.optim.lr / trainer.optim.weight_decay / trainer.optim.adam_* (the trainer builds AdamW)",
    "scheduler": "trainer.schedule.decay / trainer.schedule.warmup_steps (the trainer builds the schedule)",
}


def merge_user_config(base: Dict[str, Any], user: Dict[str, Any], source: str) -> Dict[str, Any]:
    """`base` plus every key of `user`; a user value that differs from the trainer's is an error."""
    conflicts: List[Tuple[str, Any, Any]] = []

    def merge(dst: Dict[str, Any], src: Dict[str, Any], prefix: str) -> None:
        for key, value in src.items():
            path = f"{prefix}{key}"
            if value == "auto":  # HF-style placeholders defer to the trainer
                continue
            if path in ("optimizer", "scheduler"):
                conflicts.append((path, "<built by the trainer>", value))
            elif isinstance(value, dict) and isinstance(dst.get(key), dict):
                merge(dst[key], value, path + ".")
            elif key in dst and dst[key] != value:
                conflicts.append((path, dst[key], value))
            else:
                dst[key] = value

    merged = json.loads(json.dumps(base))
    merge(merged, user, "")
    if conflicts:
        lines = [
            f"  {path}: trainer has {ours!r}, {source} has {theirs!r} (set it with "
            f"{_OWNED.get(path, 'the deepspeed.* config')})"
            for path, ours, theirs in conflicts
        ]
        raise ValueError(
            f"{source} contradicts the trainer config; remove these keys from the file or change the "
            "trainer setting:\n" + "\n".join(lines)
        )
    return merged
