"""bench/trl_baseline.py's chat template for TRL's `assistant_only_loss`: the model's template with
`{% generation %}` markers renders the same text, and the tokens TRL then supervises are exactly the
ones our data pipeline supervises (so (a) and (d) of bench/throughput.py learn the same tokens)."""

from __future__ import annotations

import pytest

from helpers import assert_same_supervision, trl_baseline

MULTI_TURN = {
    "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name an organ that filters blood."},
        {"role": "assistant", "content": "The kidney filters about 180 litres a day."},
        {"role": "user", "content": "And one that stores bile?"},
        {"role": "assistant", "content": "The gallbladder.\nIt sits under the liver."},
    ]
}


def test_the_tiny_template_marked_for_trl_supervises_what_ours_does(tiny_tokenizer):
    assert_same_supervision(tiny_tokenizer, MULTI_TURN)


def test_chatml_marked_for_trl_supervises_what_ours_does(tiny_tokenizer):
    """SmolLM2's ChatML template (with its default system prompt) on the tiny tokenizer: the same text
    and token masks as ours; tests/real_model checks it with SmolLM2's own tokenizer."""
    chatml = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tiny_tokenizer = __import__("copy").deepcopy(tiny_tokenizer)
    tiny_tokenizer.chat_template = chatml
    assert_same_supervision(tiny_tokenizer, MULTI_TURN)
    assert_same_supervision(tiny_tokenizer, {"messages": MULTI_TURN["messages"][1:]})  # default system prompt


def test_an_unknown_template_is_refused_with_what_to_do():
    with pytest.raises(ValueError, match="MARKABLE"):
        trl_baseline().marked_chat_template("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}")
    marked = "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    assert trl_baseline().marked_chat_template(marked) == marked  # already marked: as is
