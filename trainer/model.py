"""Build the model so ZeRO-3 partitions it while it is being constructed.

`HfDeepSpeedConfig` tells transformers that ZeRO-3 is on, so both `from_pretrained` and
`from_config` run under `deepspeed.zero.Init`: each parameter is partitioned as soon as it exists,
and a model larger than one rank's memory still loads. The config object must stay alive for as
long as the model is used, hence the module-level reference.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict

import torch

from trainer.config import ModelConfig, TrainerConfig

log = logging.getLogger("trainer")
_HF_DS_CONFIG = None  # keeps transformers' ZeRO-3 switch alive (it holds only a weak reference)


def build_model(cfg: ModelConfig, trainer: TrainerConfig, ds_config: Dict[str, Any], tokenizer, seq_len: int):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    global _HF_DS_CONFIG
    _HF_DS_CONFIG = HfDeepSpeedConfig(ds_config)
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    if cfg.name_or_path:
        if not (Path(cfg.name_or_path) / "config.json").is_file():
            raise FileNotFoundError(f"model.name_or_path={cfg.name_or_path!r} is not a local Hugging Face model "
                                    "directory (no config.json); download the model once and point at it")
        hf_config = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    else:
        hf_config = AutoConfig.for_model(cfg.model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                         **cfg.arch)
    max_pos = getattr(hf_config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise ValueError(f"data.seq_len={seq_len} exceeds the model's max_position_embeddings={max_pos}; lower data.seq_len")
    if cfg.name_or_path:
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, config=hf_config, dtype=dtype,
                                                     trust_remote_code=cfg.trust_remote_code,
                                                     attn_implementation=cfg.attn_implementation)
    else:
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation=cfg.attn_implementation)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        log.info("resizing embeddings to %d for added special tokens", len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    model.config.use_cache = False  # a KV cache breaks packed-document isolation and wastes memory
    if trainer.activation_checkpointing == "offload" and not torch.cuda.is_available():
        raise ValueError("trainer.activation_checkpointing=offload moves saved activations from GPU to host memory; "
                         "on CPU they are already there: use trainer.activation_checkpointing=full")
    if trainer.activation_checkpointing != "none":
        every = trainer.activation_checkpointing_every_n if trainer.activation_checkpointing == "every_n" else 1
        # Non-reentrant checkpointing: works with ZeRO-3's parameter hooks and frozen inputs.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                              every_n_layers=every, offload=trainer.activation_checkpointing == "offload")
    return model


def count_parameters(model) -> int:
    """Parameter count, correct under ZeRO-3 (where local tensors are empty) and with tied weights."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += getattr(p, "ds_numel", p.numel())
    return total
