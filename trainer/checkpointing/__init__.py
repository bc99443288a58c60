"""Keeping work: sharded DeepSpeed checkpoints (save, verify, resume, keep the last K:
`checkpoint`), resuming on another number of ranks (`reshard`), the Hugging Face export (`export`),
and stopping early without losing a step (`preemption`: signals, Slurm requeue, max_time)."""
