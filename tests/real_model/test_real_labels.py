"""Label masks under SmolLM2's real ChatML template (which adds a default system prompt to
conversations without one): the supervised tokens decode to exactly the assistant contents, each
followed by the template's end of turn `<|im_end|>\\n`, and never to a system or user turn."""

from __future__ import annotations

import pytest

from data_pipeline.formats import normalise
from data_pipeline.sources import Record
from data_pipeline.tokenization import IGNORE, encode
from helpers import assert_same_supervision

pytestmark = pytest.mark.real_model

END_OF_TURN = "<|im_end|>\n"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

MULTI_TURN = {
    "messages": [
        {"role": "user", "content": "Name an organ that filters blood."},
        {"role": "assistant", "content": "The kidney filters about 180 litres a day."},
        {"role": "user", "content": "And one that stores bile?"},
        {"role": "assistant", "content": "The gallbladder.\nIt sits under the liver."},
    ]
}


def supervised_runs(tok, record, objective):
    """The decoded text of each run of consecutive supervised tokens, and the full rendered text."""
    ids, labels = encode(tok, normalise(Record(record, "test:1"), "auto"), objective)
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r) for r in runs], tok.decode(ids)


def test_the_template_is_chatml_with_a_default_system_prompt(real_tokenizer):
    text = real_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nHi")
    assert real_tokenizer.eos_token == "<|im_end|>"


def test_instruct_learns_every_assistant_turn_and_nothing_else(real_tokenizer):
    runs, full = supervised_runs(real_tokenizer, MULTI_TURN, "instruct")
    assistant = [m["content"] for m in MULTI_TURN["messages"] if m["role"] == "assistant"]
    assert runs == [a + END_OF_TURN for a in assistant]
    assert DEFAULT_SYSTEM in full  # the template did add it to the input...
    learned = "".join(runs)
    assert "SmolLM" not in learned and "helpful" not in learned  # ...and it is never a label
    assert not any(m["content"] in learned for m in MULTI_TURN["messages"] if m["role"] == "user")


def test_sft_learns_only_the_final_answer(real_tokenizer):
    runs, _ = supervised_runs(real_tokenizer, MULTI_TURN, "sft")
    assert runs == [MULTI_TURN["messages"][-1]["content"] + END_OF_TURN]


@pytest.mark.parametrize("objective", ["sft", "instruct"])
def test_alpaca_record_single_turn(real_tokenizer, objective):
    record = {
        "instruction": "What is the normal resting heart rate?",
        "input": "Adults.",
        "output": "60 to 100 beats per minute.",
    }
    runs, full = supervised_runs(real_tokenizer, record, objective)
    assert runs == ["60 to 100 beats per minute." + END_OF_TURN]
    assert "What is the normal resting heart rate?\n\nAdults." in full


def test_a_conversation_with_its_own_system_message_replaces_the_default(real_tokenizer):
    record = {
        "messages": [
            {"role": "system", "content": "You are a cardiology nurse."},
            {"role": "user", "content": "What does an ECG measure?"},
            {"role": "assistant", "content": "The heart's electrical activity."},
        ]
    }
    runs, full = supervised_runs(real_tokenizer, record, "instruct")
    assert runs == ["The heart's electrical activity." + END_OF_TURN]
    assert full.startswith("<|im_start|>system\nYou are a cardiology nurse.<|im_end|>\n")
    assert DEFAULT_SYSTEM not in full  # one system turn, the conversation's own


def test_pretrain_objective_learns_every_token(real_tokenizer):
    ids, labels = encode(real_tokenizer, normalise(Record(MULTI_TURN, "test:1"), "auto"), "pretrain")
    assert labels == ids


def test_trl_marked_template_supervises_what_ours_does(real_tokenizer):
    """bench/throughput.py's system (d): TRL's assistant_only_loss under SmolLM2's template with the
    {% generation %} markers bench/trl_baseline.py adds supervises exactly our tokens (same ids, same mask)."""
    assert_same_supervision(real_tokenizer, MULTI_TURN)
    assert_same_supervision(real_tokenizer, {"messages": MULTI_TURN["messages"][:2]})
