"""Freezing the first blocks (trainer/forgetting/freezing.py): what is frozen in a tied and an untied
model, what the optimizer then holds, and the config's checks. On 2 ZeRO-3 ranks (frozen weights
exported unchanged, resume exact): tests/distributed/test_training.py."""

from __future__ import annotations

import pytest
import torch

from trainer.cli import load_config
from trainer.forgetting.freezing import freeze, frozen_names


def _llama(tied: bool, layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config)


def test_first_blocks_and_the_embeddings_of_an_untied_model_are_frozen():
    model = _llama(tied=False)
    done = freeze(model, first_blocks=2, embeddings=None)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in done["tensors"]} == {n for n, _ in model.named_parameters()} - trainable
    assert all(
        n.startswith(("model.layers.0.", "model.layers.1.")) or n == "model.embed_tokens.weight"
        for n in done["tensors"]
    )
    assert any(n.startswith("model.layers.2.") for n in trainable) and "lm_head.weight" in trainable
    assert "model.embed_tokens.weight" not in trainable and done["embeddings"] is True
    assert done["frozen_parameters"] == sum(p.numel() for p in model.parameters() if not p.requires_grad)


def test_a_tied_embedding_is_the_lm_head_and_stays_trainable_unless_asked():
    model = _llama(tied=True)
    freeze(model, first_blocks=1, embeddings=None)
    assert model.get_input_embeddings().weight.requires_grad  # also the LM head: the top of the model
    assert not any(p.requires_grad for p in model.model.layers[0].parameters())
    asked = _llama(tied=True)
    freeze(asked, first_blocks=1, embeddings=True)
    assert not asked.get_input_embeddings().weight.requires_grad
    only = _llama(tied=False)
    freeze(only, first_blocks=0, embeddings=True)  # the embeddings alone
    assert [n for n, p in only.named_parameters() if not p.requires_grad] == ["model.embed_tokens.weight"]


def test_a_frozen_block_gets_no_gradient_no_optimizer_state_and_keeps_its_weights():
    from trainer.config import TrainerConfig
    from trainer.engine.optim import build_optimizer

    model = _llama(tied=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    freeze(model, first_blocks=2, embeddings=None)
    optimizer, _ = build_optimizer(model, TrainerConfig(), cpu_offload=False)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == (not p.requires_grad), name
        assert (p.grad is None) == (not p.requires_grad), name
    assert len(optimizer.state) == len(held)


def test_frozen_names_refuses_freezing_every_block():
    names = [f"model.layers.{i}.w" for i in range(3)]
    assert frozen_names(names, 3, 2, "emb", False) == names[:2]
    with pytest.raises(ValueError, match=r"first_blocks=3: the model has 3 blocks; freeze 0 to 2 of them"):
        frozen_names(names, 3, 3, "emb", False)


def test_the_config_names_the_key():
    base = ["+exp=medical_qa", "output_dir=/tmp/x"]
    assert load_config(base + ["regularizer.freeze.first_blocks=2"]).regularizer.freeze.enabled
    assert not load_config(base).regularizer.freeze.enabled
    with pytest.raises(SystemExit, match=r"regularizer.freeze.first_blocks=-1: must be >= 0"):
        load_config(base + ["regularizer.freeze.first_blocks=-1"])
