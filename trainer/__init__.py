"""DeepSpeed ZeRO-3 full-parameter trainer: config, model, loop, checkpoints, tracking."""
