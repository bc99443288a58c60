"""Make a Hugging Face model of any checkpoint, on one CPU process, without the ranks that wrote it:
to go on with another number of ranks, or to evaluate or ship an intermediate step.

    python launch/export.py OUTPUT_DIR/checkpoints/step_00000040 MODEL_DIR [--bf16]

The fp32 weights are consolidated from every rank's ZeRO-3 optimizer shard (DeepSpeed's
zero_to_fp32: about 4 bytes per parameter of memory, 8 on the way), then saved as safetensors with
the config and tokenizer the checkpoint carries in model/. A new run from them:
`deepspeed launch/train.py ... model.name_or_path=MODEL_DIR output_dir=NEW_DIR` (the optimizer
state starts afresh).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer.checkpointing.export import write_hf


def export(step_dir: Path, out: Path, bf16: bool = False) -> None:
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    step_dir = step_dir.resolve()
    if not (step_dir / "COMPLETE").is_file():
        raise SystemExit(
            f"{step_dir} is not a complete checkpoint (no COMPLETE file): pick a step_* directory "
            f"that `latest` named, e.g. {step_dir.parent / 'latest'}"
        )
    if not (step_dir / "model" / "config.json").is_file():
        raise SystemExit(
            f"{step_dir / 'model'} is missing (a checkpoint saved before checkpoints carried the model "
            f"config): use `python {step_dir.parent}/zero_to_fp32.py` and the run's hf/ config instead"
        )
    config = AutoConfig.from_pretrained(step_dir / "model")
    state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if getattr(config, "tie_word_embeddings", False) and "lm_head" in k}
    if set(missing) - tied or unexpected:
        raise SystemExit(
            f"{step_dir} does not match its model config: missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.tie_weights()
    if bf16:
        model = model.to(torch.bfloat16)
    write_hf(model, AutoTokenizer.from_pretrained(step_dir / "model"), out)
    print(f"exported {step_dir} ({sum(p.numel() for p in model.parameters()):,} parameters) to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="OUTPUT_DIR/checkpoints/step_XXXXXXXX")
    parser.add_argument("out", type=Path, help="the Hugging Face model directory to write")
    parser.add_argument("--bf16", action="store_true", help="save bf16 weights (default: fp32, as trained)")
    args = parser.parse_args()
    export(args.checkpoint, args.out, args.bf16)


if __name__ == "__main__":
    main()
