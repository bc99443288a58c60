"""Unit: sources, format normalisation, label masks and the deterministic step loader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_pipeline.dataset import build_packed
from data_pipeline.formats import normalise
from data_pipeline.loader import StepLoader
from data_pipeline.sources import DataError, Record, read_records
from data_pipeline.tokenization import IGNORE, encode


def test_formats_normalise_to_messages_or_text():
    alpaca = normalise(Record({"instruction": "Define fever.", "input": "Adult", "output": "A raised temperature."}, "f:1"), "auto")
    assert alpaca.messages == [{"role": "user", "content": "Define fever.\n\nAdult"},
                               {"role": "assistant", "content": "A raised temperature."}]
    share = normalise(Record({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}, "f:2"), "auto")
    assert [m["role"] for m in share.messages] == ["user", "assistant"]
    comp = normalise(Record({"prompt": "Q:", "completion": " A"}, "f:3"), "auto")
    assert (comp.prompt, comp.text) == ("Q:", " A")
    assert normalise(Record({"text": "doc"}, "f:4"), "auto").text == "doc"


def test_malformed_record_names_file_line_field_and_expectation(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n" + json.dumps({"instruction": "x", "output": 3}) + "\n")
    records = list(read_records(str(f)))
    with pytest.raises(DataError, match=rf"{f}:2: field 'output' is a int; the alpaca format expects a string"):
        normalise(records[1], "auto")


def test_invalid_json_line_is_reported_with_its_line(tmp_path, tiny_tokenizer):
    f = tmp_path / "d.jsonl"
    good = json.dumps({"instruction": "What is a fever?", "output": "A raised body temperature."})
    f.write_text(good + "\n{broken\n" + good + "\n")
    with pytest.raises(DataError, match=rf"(?s){f}:2: not valid JSON.*data.on_error=skip"):
        build_packed(str(f), "auto", "sft", tiny_tokenizer, 128)
    packed = build_packed(str(f), "auto", "sft", tiny_tokenizer, 128, on_error="skip")
    assert packed.stats["skipped_malformed"] == 1 and packed.stats["samples"] == 2


def test_assistant_only_labels_end_with_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = normalise(Record({"messages": [{"role": "user", "content": "Name an organ."},
                                        {"role": "assistant", "content": "The liver."},
                                        {"role": "user", "content": "Another?"},
                                        {"role": "assistant", "content": "The kidney."}]}, "f:1"), "messages")
    ids, labels = encode(tok, ex, "instruct")
    learned = [t for t, l in zip(ids, labels) if l != IGNORE]
    text = tok.decode(learned)
    assert "liver" in text and "kidney" in text and "organ" not in text and "Another" not in text
    assert learned[-1] == tok.eos_token_id and learned.count(tok.eos_token_id) == 2
    ids_sft, labels_sft = encode(tok, ex, "sft")  # only the final answer
    assert "liver" not in tok.decode([t for t, l in zip(ids_sft, labels_sft) if l != IGNORE])
    assert tok.pad_token_id != tok.eos_token_id


def test_loader_layouts_with_the_same_global_batch_see_the_same_rows():
    from data_pipeline.dataset import PackedData

    n = 13
    data = PackedData(np.arange(n)[:, None].repeat(4, 1), np.zeros((n, 4)), np.zeros((n, 4)), np.ones(n))

    def step_rows(micro, accum, world, step):
        return sorted(i for r in range(world) for mb in StepLoader(data, micro, accum, r, world, seed=3).rows(step) for i in mb)

    for step in range(5):  # crosses epochs (13 rows, 8 per step)
        assert step_rows(8, 1, 1, step) == step_rows(1, 8, 1, step) == step_rows(4, 1, 2, step) == step_rows(2, 2, 2, step)
    # Resuming needs only the step: a fresh loader gives the same rows.
    assert StepLoader(data, 4, 1, 1, 2, 3).rows(7) == StepLoader(data, 4, 1, 1, 2, 3).rows(7)
    # Every row is used once per epoch.
    epoch = [i for s in range(13) for mb in StepLoader(data, 1, 1, 0, 1, 3).rows(s) for i in mb]
    assert sorted(epoch) == list(range(13))
