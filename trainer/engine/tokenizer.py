"""The tokenizer: a real model's own, or for random-init models one trained locally with
sentencepiece on the configured corpus and wrapped as a Hugging Face fast tokenizer.

A trained tokenizer is cached under $FULLFT_CACHE (default ~/.cache/fullft) by a hash of its corpus
and settings; one process per node trains it, writing to a temporary directory that is renamed
into place, so concurrent jobs never see half a tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from trainer.config import ModelConfig
from trainer.engine.model_import import require_model_dir
from trainer.paths import cache_root

log = logging.getLogger("trainer")

SPECIAL_ROLES = ["<|system|>", "<|user|>", "<|assistant|>"]
# Each message: a role marker, the content, EOS. The EOS after an assistant turn is learned, so
# the model learns to stop; generation prompts end with the assistant marker.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer for `cfg`, with a pad token (never a new one: see below) and the configured chat
    template."""
    from transformers import AutoTokenizer

    require_model_dir(cfg.tokenizer_path or cfg.name_or_path)  # e.g. model=smollm2_135m not imported yet
    path = cfg.tokenizer_path or cfg.name_or_path
    if path is None:
        path = str(trained_tokenizer_dir(cfg))
    elif not Path(path).is_dir():
        raise FileNotFoundError(
            f"tokenizer directory {path!r} does not exist (model.tokenizer_path / "
            "model.name_or_path must be a local Hugging Face directory)"
        )
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if cfg.chat_template:
        tok.chat_template = cfg.chat_template
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer at {path} has no EOS token; packed documents need one")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        # A distinct pad reads better in a padded row, so a spare unk takes the role (SmolLM2: pad =
        # eos = <|im_end|>, unk = <|endoftext|>). Nothing depends on it: labels are masked by the data
        # pipeline, never by pad id, and generation pads with an attention mask. So the vocabulary is
        # never grown for it: a new token would add an untrained embedding row to a pretrained model
        # and change the vocabulary size its export ships with. Without a spare unk, pad = EOS.
        if tok.unk_token_id is not None and tok.unk_token_id != tok.eos_token_id:
            tok.pad_token = tok.unk_token
        elif tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
    return tok


def _corpus_lines(files) -> Iterator[str]:
    """Text of every corpus file; for JSON lines, the string values of each record."""
    for file in files:
        with open(file, encoding="utf-8") as f:
            for line in f:
                if file.endswith(".jsonl") and line.strip():
                    yield from (v for v in json.loads(line).values() if isinstance(v, str))
                elif line.strip():
                    yield line.rstrip("\n")


def trained_tokenizer_dir(cfg: ModelConfig) -> Path:
    """Train (once) and cache a sentencepiece BPE tokenizer on cfg.tokenizer_corpus."""
    import sentencepiece

    missing = [f for f in cfg.tokenizer_corpus if not Path(f).is_file()]
    if missing or not cfg.tokenizer_corpus:
        raise FileNotFoundError(
            f"model.tokenizer_corpus: {missing or 'empty list'} not found; the tiny model trains its tokenizer "
            "on these files. Point model.tokenizer_corpus at existing text/jsonl files (the bundled samples "
            "live in data_pipeline/bundled/) or set model.name_or_path to a local Hugging Face directory."
        )
    digest = hashlib.sha256(f"{cfg.tokenizer_vocab_size}|{sentencepiece.__version__}|v1".encode())
    for file in cfg.tokenizer_corpus:
        digest.update(Path(file).read_bytes())
    target = cache_root() / "tokenizers" / digest.hexdigest()[:16]
    if (target / "tokenizer_config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        _train_sentencepiece(cfg, Path(tmp))
        try:
            os.replace(Path(tmp) / "hf", target)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(Path(tmp) / "hf", ignore_errors=True)
    log.info(
        "trained a %d-token sentencepiece tokenizer on %s -> %s", cfg.tokenizer_vocab_size, cfg.tokenizer_corpus, target
    )
    return target


def _train_sentencepiece(cfg: ModelConfig, workdir: Path) -> None:
    import sentencepiece as spm
    from tokenizers.models import BPE
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    corpus = workdir / "corpus.txt"
    corpus.write_text("\n".join(_corpus_lines(cfg.tokenizer_corpus)), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(workdir / "sp"),
        vocab_size=cfg.tokenizer_vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        num_threads=1,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        user_defined_symbols=SPECIAL_ROLES,
        minloglevel=2,
    )
    extracted = SentencePieceExtractor(str(workdir / "sp.model")).extract(BPE)
    tok = LlamaTokenizer(
        vocab=extracted["vocab"],
        merges=extracted["merges"],
        pad_token="<pad>",
        add_bos_token=False,
        add_eos_token=False,
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_ROLES})
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.model_max_length = 1 << 20
    tok.save_pretrained(str(workdir / "hf"))
