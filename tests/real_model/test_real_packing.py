"""Packing with the real model and tokenizer: documents packed into one row do not see each other
through all 30 layers of SmolLM2 (position_ids restart per document, sdpa, no cache), and the
bundled data packs efficiently with its tokenizer."""

from __future__ import annotations

import math

import pytest
import torch

from data_pipeline.formats import normalise
from data_pipeline.packing import IGNORE
from data_pipeline.prepare import PrepareOptions, prepare
from data_pipeline.sources import read_records
from data_pipeline.tokenization import encode
from trainer.config import bundled_path

pytestmark = pytest.mark.real_model

SYSTEM = "You are a careful clinical assistant."


@pytest.fixture(scope="module")
def qa_rows(real_tokenizer, tmp_path_factory):
    """The bundled medical QA pairs prepared as `+exp=medical_qa` would, at seq_len 256, with a
    configured system prompt."""
    return prepare(
        bundled_path("medical_qa.jsonl"),
        real_tokenizer,
        PrepareOptions(objective="instruct", seq_len=256, system_prompt=SYSTEM),
        str(tmp_path_factory.mktemp("prepared")),
    )


def documents(position_ids, filled):
    """(start, end) of each real document in a packed row: a position 0 starts one."""
    starts = [i for i in range(filled) if position_ids[i] == 0] + [filled]
    return list(zip(starts[:-1], starts[1:]))


def test_packed_documents_are_isolated_through_all_layers(smollm2_dir, qa_rows):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    assert model.config.num_hidden_layers == 30
    r = max(range(len(qa_rows)), key=lambda i: len(documents(qa_rows.position_ids[i], int(qa_rows.filled[i]))))
    row = qa_rows.rows([r])  # the row with the most documents
    ids, positions = torch.tensor(row["input_ids"]), torch.tensor(row["position_ids"])
    docs = documents(row["position_ids"][0], int(qa_rows.filled[r]))
    assert len(docs) >= 3
    worst = 0.0
    with torch.no_grad():
        # attention_mask=None and no cache: transformers builds the per-document causal mask.
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
        for a, b in docs:
            alone = model(input_ids=ids[:, a:b], use_cache=False).logits[0]
            worst = max(worst, (packed[a:b] - alone).abs().max().item())
    # Logits reach ~40 here; a document that saw its neighbour differs by ~0.1-1, fp32 reordering by ~5e-5.
    assert worst < 2e-4, f"packed documents differ from themselves alone by {worst:.3g}"
    print(f"{len(docs)} packed documents, worst |logit difference| vs alone: {worst:.2g}")


def test_packed_labels_never_learn_the_system_or_user_turns(real_tokenizer, qa_rows):
    """Every supervised run of every packed row is an assistant answer ending in the end of turn."""
    for r in range(len(qa_rows)):
        row = qa_rows.rows([r])
        labels = row["labels"][0]
        runs, current = [], []
        for token, label in zip(row["input_ids"][0], labels):
            if label != IGNORE:
                current.append(int(token))
            elif current:
                runs.append(current)
                current = []
        runs += [current] if current else []
        for run in runs:
            text = real_tokenizer.decode(run)
            assert text.endswith("<|im_end|>\n") and text.count("<|im_end|>") == 1, text
            assert SYSTEM not in text and "<|im_start|>" not in text and "SmolLM" not in text, text
    assert real_tokenizer.decode(qa_rows.rows([0])["input_ids"][0][:12]).startswith(f"<|im_start|>system\n{SYSTEM}")


def next_fit_rows(lengths, seq_len):
    """Rows a naive packer needs: samples in order, a new row whenever the next one does not fit."""
    rows, room = 0, 0
    for n in lengths:
        if n > room:
            rows, room = rows + 1, seq_len
        room -= n
    return rows


@pytest.mark.parametrize(
    "source,objective",
    [("medical_qa.jsonl", "instruct"), ("medical_notes.txt", "pretrain"), ("general_text.txt", "pretrain")],
)
@pytest.mark.parametrize("seq_len", [256, 512])
def test_bundled_data_packs_efficiently(real_tokenizer, tmp_path_factory, source, objective, seq_len):
    prepared = prepare(
        bundled_path(source),
        real_tokenizer,
        PrepareOptions(objective=objective, seq_len=seq_len),
        str(tmp_path_factory.mktemp("prepared")),
    )
    stats = prepared.stats
    fewest = math.ceil(stats["real_tokens"] / seq_len)
    if objective == "pretrain":  # documents back to back, cut into rows: only the last row is short
        assert stats["rows"] == fewest, stats
    else:  # whole samples, best-fit decreasing: better than packing them in order
        lengths = [
            len(encode(real_tokenizer, normalise(record, "auto"), objective)[0])
            for record in read_records(bundled_path(source))
        ]  # in file order
        assert len(lengths) == stats["samples"] and sum(lengths) == stats["real_tokens"]
        assert stats["rows"] < next_fit_rows(lengths, seq_len), stats
        assert stats["packing_efficiency"] >= 0.9, stats
    print(
        f"{source} {objective} seq_len {seq_len}: {stats['rows']} rows (token bound {fewest}), "
        f"packing efficiency {stats['packing_efficiency']:.3f}"
    )
