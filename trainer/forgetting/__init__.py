"""Forgetting control: what keeps a fine-tuned model close to what its base knew.

- `ewc` (with its pure math in `ewc_math`): a penalty the loop applies at the optimizer-step
  boundary, on each rank's ZeRO-3 shard, as a component (trainer/components.py).
- `interpolation`: after the last step, θ0 + α(θ − θ0) scored and chosen per α, before the export
  (α uniform, per depth group, or LiNeS's depth-linear λ(ℓ) = α + β·ℓ/(L−1)).
- `freezing`: the first blocks kept at θ0 for the whole stage (no gradient, no optimizer state).
- `rehearsal`: the base model's own answers to general prompts, written once, replayed as data.
Replay itself is a data source the mixer interleaves (trainer/data.py, data_pipeline/mixing.py)."""
