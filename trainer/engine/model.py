"""Build the model so ZeRO-3 partitions it while it is being constructed.

`HfDeepSpeedConfig` tells transformers that ZeRO-3 is on, so both `from_pretrained` and
`from_config` run under `deepspeed.zero.Init`: each parameter is partitioned as soon as it exists,
and a model larger than one rank's memory still loads. The config object must stay alive for as
long as the model is used, hence the module-level reference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict

import torch

from trainer.config import ModelConfig, TrainerConfig
from trainer.objectives import head
from trainer.observability.redaction import is_secret_key

log = logging.getLogger("trainer")
_HF_DS_CONFIG = None  # keeps transformers' ZeRO-3 switch alive (it holds only a weak reference)


def model_config(cfg: ModelConfig, tokenizer, seq_len: int, packed: bool = True):
    """The model's Hugging Face config, checked before any data is read or weights are built: a
    local directory with config.json, data.seq_len within its positions, and (packing) an attention
    backend that keeps packed documents apart."""
    from transformers import AutoConfig

    global _HF_DS_CONFIG
    _HF_DS_CONFIG = None  # an earlier stage's ZeRO-3 switch must not partition the isolation probe
    if cfg.name_or_path:
        if not (Path(cfg.name_or_path) / "config.json").is_file():
            raise FileNotFoundError(
                f"model.name_or_path={cfg.name_or_path!r} is not a local Hugging Face model "
                "directory (no config.json); download the model once and point at it"
            )
        hf_config = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    else:
        # A secret-looking key would be saved with the model (hf/config.json): never passed on.
        arch = {k: v for k, v in cfg.arch.items() if not is_secret_key(k)}
        if len(arch) < len(cfg.arch):
            log.warning(
                "model.arch: ignoring %s (secret-looking keys are never written to the model config)",
                sorted(set(cfg.arch) - set(arch)),
            )
        # model.arch.vocab_size may pad the vocabulary past the tokenizer's (e.g. to a real model's size,
        # for memory benchmarks of the LM head); never below it.
        vocab = max(len(tokenizer), int(arch.pop("vocab_size", 0) or 0))
        hf_config = AutoConfig.for_model(
            cfg.model_type,
            vocab_size=vocab,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **arch,
        )
    max_pos = getattr(hf_config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise ValueError(
            f"data.seq_len={seq_len} exceeds the model's max_position_embeddings={max_pos}; lower data.seq_len"
        )
    if packed:
        check_packed_isolation(hf_config, str(cfg.attn_implementation))
    return hf_config


def build_model(cfg: ModelConfig, hf_config, trainer: TrainerConfig, ds_config: Dict[str, Any], tokenizer):
    """The model for `hf_config` (from model_config), partitioned by ZeRO-3 as it is constructed."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    global _HF_DS_CONFIG
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    _HF_DS_CONFIG = HfDeepSpeedConfig(ds_config)  # from here on, models are built under zero.Init
    if cfg.name_or_path:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path,
            config=hf_config,
            dtype=dtype,
            trust_remote_code=cfg.trust_remote_code,
            attn_implementation=str(cfg.attn_implementation),
        )
    else:
        model = AutoModelForCausalLM.from_config(
            hf_config, dtype=dtype, attn_implementation=str(cfg.attn_implementation)
        )
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        log.info("resizing embeddings to %d for added special tokens", len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    model.config.use_cache = False  # a KV cache breaks packed-document isolation and wastes memory
    # from_pretrained returns the model in eval mode, where Hugging Face's decoder layers skip
    # activation checkpointing (and dropout): a pretrained model would train without either.
    model.train()
    # The loss from the LM head a chunk of tokens at a time (no [tokens x vocab] logits kept).
    head.install(model, head.chunking_for(model.config, trainer.loss_chunk_tokens), trainer.loss_kernel)
    if trainer.activation_checkpointing == "offload" and not torch.cuda.is_available():
        raise ValueError(
            "trainer.activation_checkpointing=offload moves saved activations from GPU to host memory; "
            "on CPU they are already there: use trainer.activation_checkpointing=full"
        )
    if trainer.activation_checkpointing != "none":
        every = trainer.activation_checkpointing_every_n if trainer.activation_checkpointing == "every_n" else 1
        # Non-reentrant checkpointing: works with ZeRO-3's parameter hooks and frozen inputs.
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False},
            every_n_layers=every,
            offload=trainer.activation_checkpointing == "offload",
        )
    return model


def check_packed_isolation(hf_config, attn_implementation: str) -> None:
    """Refuse, before the real model is built, an architecture + attention backend that would let
    packed documents attend to each other. Proven on a 2-layer, narrow copy of the architecture
    (random weights, CPU, about a second): the second document's logits inside a packed row must
    equal its logits alone."""
    import copy

    from transformers import AutoModelForCausalLM

    if attn_implementation == "flex_attention" and not torch.cuda.is_available():
        log.info("flex_attention isolation is checked on GPU runs only")
        return
    a, b = torch.arange(3, 10)[None], torch.arange(20, 25)[None]
    try:
        small = copy.deepcopy(hf_config)
        heads = 4
        changes = {
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": heads,
            "num_key_value_heads": 2,
            "head_dim": 16,
        }
        for key, value in changes.items():
            if hasattr(small, key) and not isinstance(getattr(type(small), key, None), property):
                setattr(small, key, value)
        if isinstance(getattr(small, "layer_types", None), list):
            small.layer_types = small.layer_types[:2]
        # A pass is remembered per architecture, backend and library versions: every later run of
        # the same model (each test, each rank, each resume) skips the probe (~2 s of model code).
        verdict = _isolation_verdict_path(small, attn_implementation)
        if verdict.is_file():
            return
        probe = AutoModelForCausalLM.from_config(
            small, dtype=torch.float32, attn_implementation=attn_implementation
        ).eval()
        packed_ids = torch.cat([a, b], dim=1)
        positions = torch.cat([torch.arange(a.size(1)), torch.arange(b.size(1))])[None]
        with torch.no_grad():
            packed = probe(input_ids=packed_ids, position_ids=positions, use_cache=False).logits[0, a.size(1) :]
            alone = probe(input_ids=b, use_cache=False).logits[0]
    except Exception as ex:  # an architecture we cannot shrink or probe: say so instead of guessing
        raise ValueError(
            f"could not verify that model_type={hf_config.model_type!r} with attn_implementation="
            f"{attn_implementation!r} isolates packed documents ({type(ex).__name__}: {ex}); "
            "set data.packing=false to train one sample per row"
        ) from ex
    if not torch.allclose(packed, alone, atol=1e-4):
        raise ValueError(
            f"model_type={hf_config.model_type!r} with attn_implementation={attn_implementation!r} "
            "lets packed documents attend to each other (checked on a small copy: it masks by row, not "
            "by document). Try another model.attn_implementation (sdpa, eager; flex_attention on GPU) "
            "or set data.packing=false to train one sample per row."
        )
    verdict.parent.mkdir(parents=True, exist_ok=True)
    tmp = verdict.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"isolated": True, "max_abs_diff": float((packed - alone).abs().max())}))
    os.replace(tmp, verdict)


def _isolation_verdict_path(small_config, attn_implementation: str):
    """Where a passed isolation check of this (shrunk) architecture is recorded: keyed by its whole
    config, the attention backend, and the torch and transformers versions that computed it."""
    import transformers

    from trainer.paths import cache_root

    key = hashlib.sha256(
        "|".join(
            [
                small_config.to_json_string(use_diff=False),
                attn_implementation,
                torch.__version__,
                transformers.__version__,
            ]
        ).encode()
    ).hexdigest()[:16]
    return cache_root() / "isolation" / f"{small_config.model_type}-{attn_implementation}-{key}.json"


def count_parameters(model) -> int:
    """Parameter count, correct under ZeRO-3 (where local tensors are empty) and with tied weights."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += getattr(p, "ds_numel", p.numel())
    return total
