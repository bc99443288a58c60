"""Forgetting control: what keeps a fine-tuned model close to what its base knew.

- `ewc` (with its pure math in `ewc_math`): a penalty the loop applies at the optimizer-step
  boundary, on each rank's ZeRO-3 shard, as a component (trainer/components.py).
- `interpolation`: after the last step, θ0 + α(θ − θ0) scored and chosen per α, before the export.
- `rehearsal`: the base model's own answers to general prompts, written once, replayed as data.
Replay itself is a data source the mixer interleaves (trainer/data.py, data_pipeline/mixing.py)."""
