"""The start's own answers made inside a stage (regularizer.distill.prompts, trainer/forgetting/
rehearsal.py): batched, left-padded generation equals the one-prompt-at-a-time greedy answers of
launch/rehearse.py; answers cut off are dropped or kept as asked; the file is cached by the start and
the prompts. On 2 ZeRO-3 ranks (answers dealt to the ranks and gathered):
tests/distributed/test_training.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from trainer.forgetting import rehearsal

PROMPTS = ["What is a river?", "Name a colour, please, and say why you like it.", "Hi", "Tell me about tea."]


@pytest.fixture(scope="module", autouse=True)
def one_rank_group():
    """generate(synced_gpus=True) asks the process group whether every rank is done: a group of one."""
    import torch.distributed as dist

    from trainer.distributed.launcher import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.engine.tokenizer import TINY_CHAT_TEMPLATE

    tok = _tokenizer()
    tok.chat_template = TINY_CHAT_TEMPLATE
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval(), tok


def _tokenizer():
    from trainer.cli import load_config
    from trainer.engine.tokenizer import load_tokenizer

    return load_tokenizer(load_config(["output_dir=/tmp/x"]).model)


def engine_of(model):
    return SimpleNamespace(module=model, device=torch.device("cpu"))


def test_batched_answers_equal_one_at_a_time(model_and_tokenizer):
    model, tok = model_and_tokenizer
    alone = list(rehearsal.answers(model, tok, PROMPTS, 12))
    for batch in (1, 3):
        batched = rehearsal.answers_on_engine(engine_of(model), tok, PROMPTS, 12, 0, 1, batch_size=batch)
        assert [a.prompt for a in batched] == PROMPTS  # in prompt order, whatever the length order
        assert [a.answer_ids for a in batched] == [a.answer_ids for a in alone]
        assert [(a.text, a.finished) for a in batched] == [(a.text, a.finished) for a in alone]


def test_an_answer_ends_at_the_end_of_turn_and_a_cut_off_one_is_flagged(model_and_tokenizer, monkeypatch):
    model, tok = model_and_tokenizer
    eos = tok.eos_token_id
    fake = [[5, 6, eos, eos], [7, 8, 9, 10]]  # the first ended (padded after), the second was cut off
    monkeypatch.setattr(
        "trainer.observability.generation.generate_left_padded", lambda engine, prompts, *a, **k: fake[: len(prompts)]
    )
    got = rehearsal.answers_on_engine(engine_of(model), tok, PROMPTS[:2], 4, rank=0, world_size=1, batch_size=2)
    by_prompt = {a.prompt: a for a in got}
    longest = max(PROMPTS[:2], key=lambda p: len(rehearsal._chat_ids(tok, p, None)))  # batched longest first
    other = next(p for p in PROMPTS[:2] if p != longest)
    assert by_prompt[longest].answer_ids == [5, 6, eos] and by_prompt[longest].finished
    assert by_prompt[other].answer_ids == [7, 8, 9, 10] and not by_prompt[other].finished


def test_own_answers_are_cached_by_start_and_prompts_and_cut_off_ones_dropped(
    model_and_tokenizer, tmp_path, monkeypatch
):
    model, tok = model_and_tokenizer
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    kw = dict(batch_size=2, rank=0, world_size=1, local_rank=0)

    # The random model never ends its turn within 6 tokens: without keep_cut_off nothing is left.
    def own(start, tokens, keep):
        cache = str(tmp_path / "c")
        return rehearsal.own_answers(engine_of(model), tok, str(prompts), start, cache, tokens, keep, **kw)

    with pytest.raises(RuntimeError, match=r"none of the start's 4 answers ended within .*answer_tokens=6 .*cut_off"):
        own("start", 6, False)
    out = own("start", 6, True)
    assert out.parent == tmp_path / "c" / "own_answers" and out.name.startswith("start-")
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    alone = list(rehearsal.answers(model, tok, PROMPTS, 6))
    assert records == [rehearsal.record(a) for a in alone]
    # A second call reads the file: no generation.
    monkeypatch.setattr(rehearsal, "answers_on_engine", lambda *a, **k: pytest.fail("generated again"))
    assert own("start", 6, True) == out
    # Another start, other prompts or another length is another file.
    monkeypatch.undo()
    other, longer = own("other", 6, True), own("start", 7, True)
    assert len({out, other, longer}) == 3
