"""The Hugging Face export: output_dir/hf, the model as safetensors with its tokenizer and chat
template, loadable by `AutoModelForCausalLM.from_pretrained` (and what launch/export.py makes of
any checkpoint). `Export` is the loop's component that writes it after the last step."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from trainer import distributed
from trainer.components import Component

log = logging.getLogger("trainer")


class Export(Component):
    """After the last step: the export, and (with interpolation) the chosen α beside it in
    hf/interpolation.json. Collective: every rank gathers its shards."""

    def __init__(self, engine, tokenizer, output_dir: str, rank: int, interpolation=None) -> None:
        self.engine, self.tokenizer, self.rank, self.interpolation = engine, tokenizer, rank, interpolation
        self.out = Path(output_dir) / "hf"

    def on_end(self, state, tracker) -> None:
        export_hf(self.engine, self.tokenizer, str(self.out), self.rank)
        chosen = getattr(self.interpolation, "result", None)
        if chosen is not None and self.rank == 0:
            (self.out / "interpolation.json").write_text(json.dumps(chosen, indent=2))


def export_hf(engine, tokenizer, out_dir: str, rank: int) -> None:
    """Write the model to `out_dir` as a Hugging Face model (safetensors + tokenizer + chat template).

    Every rank takes part in gathering the ZeRO-3 shards (layer by layer, onto rank 0's CPU);
    rank 0 writes. Tied weights stay tied: the gathered state dict holds one tensor under both
    names and save_pretrained stores it once. Written to a temporary directory and renamed, so a
    half-written export never sits at `out_dir`.
    """
    state_dict = engine._zero3_consolidated_16bit_state_dict()
    if rank == 0:
        write_hf(engine.module, tokenizer, Path(out_dir), state_dict)
        log.info("exported Hugging Face model to %s", out_dir)
    distributed.barrier()


def write_hf(model, tokenizer, out: Path, state_dict=None) -> None:
    """save_pretrained (safetensors, use_cache on: for inference) + the tokenizer, into a temporary
    directory renamed to `out`, so a half-written export never sits there."""
    tmp = Path(f"{out}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    use_cache, model.config.use_cache = model.config.use_cache, True
    try:
        model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
    finally:
        model.config.use_cache = use_cache
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
