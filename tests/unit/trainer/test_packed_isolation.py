"""trainer/model.check_packed_isolation: proven on a small copy once, then remembered per architecture,
backend and library versions; a refusal is never remembered."""

from __future__ import annotations

import pytest
import transformers

from trainer.engine.model import check_packed_isolation


def _llama():
    return transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def test_a_pass_is_remembered_and_the_probe_is_not_run_again(tmp_path, monkeypatch):
    monkeypatch.setenv("FULLFT_CACHE", str(tmp_path))
    check_packed_isolation(_llama(), "sdpa")
    (verdict,) = (tmp_path / "isolation").iterdir()
    assert verdict.name.startswith("llama-sdpa-") and '"isolated": true' in verdict.read_text()

    def no_probe(*args, **kwargs):
        raise AssertionError("the probe ran again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", no_probe)
    check_packed_isolation(_llama(), "sdpa")  # remembered
    with pytest.raises(ValueError, match="could not verify"):  # another backend: probed (and here it fails)
        check_packed_isolation(_llama(), "eager")


def test_a_refusal_is_not_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("FULLFT_CACHE", str(tmp_path))
    opt = transformers.OPTConfig(
        vocab_size=64,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
    )
    for _ in range(2):
        with pytest.raises(ValueError, match="lets packed documents attend to each other"):
            check_packed_isolation(opt, "sdpa")
    assert not (tmp_path / "isolation").exists()
