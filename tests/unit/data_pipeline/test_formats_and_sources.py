"""Unit: sources, format normalisation, label masks, and the bad-input matrix (each bad input gives
its exact message, or with data.on_error=skip a counted skip)."""

from __future__ import annotations

import json

import pytest

from data_pipeline.formats import normalise
from data_pipeline.prepare import PrepareOptions, prepare
from data_pipeline.sources import DataError, Record, read_records
from data_pipeline.tokenization import IGNORE, encode

QA = {"instruction": "What is a fever?", "output": "A raised body temperature."}


def jl(*objs) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


# ---- formats ------------------------------------------------------------------------------------


def test_every_format_normalises_to_messages_or_text():
    alpaca = normalise(
        Record(
            {
                "instruction": "Define fever.",
                "input": "Adult",
                "output": "A raised temperature.",
                "system": "Be brief.",
            },
            "f:1",
        ),
        "auto",
    )
    assert alpaca.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Define fever.\n\nAdult"},
        {"role": "assistant", "content": "A raised temperature."},
    ]
    share = normalise(
        Record(
            {
                "conversations": [
                    {"from": "system", "value": "s"},
                    {"from": "human", "value": "hi"},
                    {"from": "gpt", "value": "hello"},
                ]
            },
            "f:2",
        ),
        "auto",
    )
    assert [m["role"] for m in share.messages] == ["system", "user", "assistant"]
    msgs = normalise(
        Record(
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"},
                    {"role": "assistant", "content": "d"},
                ]
            },
            "f:3",
        ),
        "auto",
    )
    assert [m["content"] for m in msgs.messages] == ["a", "b", "c", "d"]
    comp = normalise(Record({"prompt": "Q:", "completion": " A"}, "f:4"), "auto")
    assert (comp.prompt, comp.text) == ("Q:", " A")
    assert normalise(Record({"text": "doc"}, "f:5"), "auto").text == "doc"
    # a forced format reads the record as that format
    with pytest.raises(DataError, match="f:6: field 'text' is missing; the text format expects a string"):
        normalise(Record(QA, "f:6"), "text")


def test_sources_read_every_file_kind(tmp_path):
    import pandas as pd
    from datasets import Dataset, DatasetDict

    (tmp_path / "a.jsonl").write_text(jl(QA))
    (tmp_path / "b.json").write_text(json.dumps([QA, QA]))
    (tmp_path / "c.txt").write_text("doc one\nline two\n\n\ndoc two\n")
    pd.DataFrame([QA]).to_parquet(tmp_path / "d.parquet")
    pd.DataFrame([QA]).to_csv(tmp_path / "e.csv", index=False)
    records = list(read_records(str(tmp_path)))
    assert [r.where.rsplit("/", 1)[1] for r in records] == [
        "a.jsonl:1",
        "b.json:[0]",
        "b.json:[1]",
        "c.txt:1",
        "c.txt:5",
        "d.parquet:[0]",
        "e.csv:2",
    ]
    assert records[3].data == {"text": "doc one\nline two"}
    assert records[5].data == QA and records[6].data == QA
    Dataset.from_list([QA] * 3).save_to_disk(str(tmp_path / "saved"))
    assert len(list(read_records(str(tmp_path / "saved")))) == 3
    DatasetDict({"train": Dataset.from_list([QA]), "test": Dataset.from_list([QA] * 2)}).save_to_disk(
        str(tmp_path / "dd")
    )
    assert len(list(read_records(str(tmp_path / "dd"), split="test"))) == 2
    with pytest.raises(DataError, match=r"splits \['test', 'train'\], not 'dev'; set data.split"):
        list(read_records(str(tmp_path / "dd"), split="dev"))


# ---- labels -------------------------------------------------------------------------------------


def test_assistant_only_labels_end_with_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = normalise(
        Record(
            {
                "messages": [
                    {"role": "system", "content": "You are a nurse."},
                    {"role": "user", "content": "Name an organ."},
                    {"role": "assistant", "content": "The liver."},
                    {"role": "user", "content": "Another?"},
                    {"role": "assistant", "content": "The kidney."},
                ]
            },
            "f:1",
        ),
        "messages",
    )
    ids, labels = encode(tok, ex, "instruct")
    learned = [t for t, lab in zip(ids, labels) if lab != IGNORE]
    text = tok.decode(learned)
    assert (
        "liver" in text and "kidney" in text and "organ" not in text and "Another" not in text and "nurse" not in text
    )
    assert learned[-1] == tok.eos_token_id and learned.count(tok.eos_token_id) == 2
    ids_sft, labels_sft = encode(tok, ex, "sft")  # only the final answer
    sft_text = tok.decode([t for t, lab in zip(ids_sft, labels_sft) if lab != IGNORE])
    assert "kidney" in sft_text and "liver" not in sft_text
    ids_pt, labels_pt = encode(tok, ex, "pretrain")  # every token
    assert labels_pt == ids_pt
    assert tok.pad_token_id != tok.eos_token_id


def test_completion_loss_is_on_the_completion_and_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    ids, labels = encode(
        tok, normalise(Record({"prompt": "Dose of drug X:", "completion": " ten milligrams"}, "f:1"), "auto"), "sft"
    )
    learned = [t for t, lab in zip(ids, labels) if lab != IGNORE]
    assert tok.decode(learned[:-1]).strip() == "ten milligrams" and learned[-1] == tok.eos_token_id
    assert labels[0] == IGNORE


# ---- bad-input matrix ---------------------------------------------------------------------------
# (case, file name, bytes, message it raises with data.on_error=raise, count under on_error=skip)
# The message names file:line, the field and what was expected; "{f}" is the file's path.
BAD_INPUTS = [
    (
        "malformed JSON line",
        "d.jsonl",
        (jl(QA) + "{broken\n" + jl(QA)).encode(),
        r"{f}:2: not valid JSON \(Expecting property name enclosed in double quotes at column 2\)",
        "skipped_malformed",
    ),
    (
        "missing field",
        "d.jsonl",
        jl(QA, {"instruction": "Q?"}).encode(),
        r"{f}:2: cannot tell the format from keys \['instruction'\]",
        "skipped_malformed",
    ),
    (
        "wrong type",
        "d.jsonl",
        jl(QA, {"instruction": "Q?", "output": 3}).encode(),
        r"{f}:2: field 'output' is a int; the alpaca format expects a string",
        "skipped_malformed",
    ),
    (
        "unknown role",
        "d.jsonl",
        jl(QA, {"messages": [{"role": "doctor", "content": "x"}, {"role": "assistant", "content": "y"}]}).encode(),
        r"{f}:2: messages\[0\] must have 'role' \(system/user/assistant\) and a string 'content'",
        "skipped_malformed",
    ),
    (
        "empty text",
        "d.jsonl",
        jl({"text": "fine"}, {"text": "   "}).encode(),
        r"{f}:2: field 'text' is empty",
        "skipped_malformed",
    ),
    (
        "empty answer",
        "d.jsonl",
        jl(QA, {"instruction": "Q?", "output": ""}).encode(),
        r"{f}:2: field 'output' is empty; there is nothing to learn",
        "skipped_malformed",
    ),
    (
        "non-UTF-8 bytes",
        "d.jsonl",
        jl(QA).encode() + b'{"text": "caf\xe9"}\n',
        r"{f}:2: not valid UTF-8 \(byte 0xe9 at column 14\); re-encode the file as UTF-8",
        "skipped_malformed",
    ),
    (
        "truncated last line",
        "d.jsonl",
        (jl(QA) + '{"instruction": "Q?", "outp').encode(),
        r"{f}:2: not valid JSON .*it is the last line and has no newline: the file looks truncated",
        "skipped_malformed",
    ),
    (
        "not an object",
        "d.jsonl",
        (jl(QA) + "[1, 2]\n").encode(),
        r"{f}:2: expected a JSON object, got list",
        "skipped_malformed",
    ),
]


@pytest.mark.parametrize("case,name,content,message,count", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_named_or_counted(tmp_path, tiny_tokenizer, case, name, content, message, count):
    f = tmp_path / name
    f.write_bytes(content)
    opts = PrepareOptions(objective="sft", seq_len=128)
    with pytest.raises(DataError, match=message.format(f=f)) as raised:
        prepare(str(f), tiny_tokenizer, opts, str(tmp_path / "cache"))
    assert "data.on_error=skip" in str(raised.value)
    skipped = prepare(
        str(f), tiny_tokenizer, PrepareOptions(objective="sft", seq_len=128, on_error="skip"), str(tmp_path / "cache")
    )
    assert skipped.stats[count] == 1 and skipped.stats["samples"] == skipped.stats["records"] - 1
    assert json_manifest(skipped)["stats"][count] == 1  # reported in the manifest too


def json_manifest(prepared):
    return json.loads((prepared.directory / "manifest.json").read_text())


def test_bom_and_crlf_are_read_as_plain_utf8(tmp_path, tiny_tokenizer):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + jl(QA, QA).replace("\n", "\r\n").encode())
    assert [r.data for r in read_records(str(f))] == [QA, QA]
    t = tmp_path / "d.txt"
    t.write_bytes(b"\xef\xbb\xbfFirst doc.\r\nStill first.\r\n\r\nSecond doc.\r\n")
    assert [r.data["text"] for r in read_records(str(t))] == ["First doc.\nStill first.", "Second doc."]


def test_empty_file_and_missing_path_and_unsupported_type(tmp_path, tiny_tokenizer):
    opts = PrepareOptions(objective="sft", seq_len=128)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty.jsonl: file is empty"):
        prepare(str(tmp_path / "empty.jsonl"), tiny_tokenizer, opts, str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"nope.jsonl: no such file or directory \(check data.path"):
        prepare(str(tmp_path / "nope.jsonl"), tiny_tokenizer, opts, str(tmp_path / "c"))
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(DataError, match=r"unsupported file type '.xml'"):
        prepare(str(tmp_path / "x.xml"), tiny_tokenizer, opts, str(tmp_path / "c"))
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"blank.jsonl: no usable samples out of 0 records"):
        prepare(str(tmp_path / "blank.jsonl"), tiny_tokenizer, opts, str(tmp_path / "c"))


def test_overlong_samples_are_truncated_dropped_or_split_and_counted(tmp_path, tiny_tokenizer):
    long_answer = "The patient should rest and drink fluids. " * 40
    f = tmp_path / "d.jsonl"
    f.write_text(jl(QA, {"instruction": "Advice?", "output": long_answer}))
    cache = str(tmp_path / "c")
    truncated = prepare(str(f), tiny_tokenizer, PrepareOptions(objective="sft", seq_len=64, overlong="truncate"), cache)
    assert truncated.stats["truncated_overlong"] == 1 and truncated.stats["samples"] == 2
    assert truncated.filled.max() <= 64
    dropped = prepare(str(f), tiny_tokenizer, PrepareOptions(objective="sft", seq_len=64, overlong="drop"), cache)
    assert dropped.stats["dropped_overlong"] == 1 and dropped.stats["samples"] == 1
    doc = tmp_path / "d.txt"
    doc.write_text(long_answer + "\n\nShort note.\n")
    split = prepare(str(doc), tiny_tokenizer, PrepareOptions(objective="pretrain", seq_len=64, overlong="split"), cache)
    assert split.stats["split_overlong"] == 1 and split.stats["real_tokens"] > 64 * 3  # nothing cut away


def test_a_sample_with_no_supervised_token_never_reaches_the_loss(tmp_path, tiny_tokenizer):
    # A prompt so long that truncation to seq_len leaves none of the answer: dropped and counted.
    f = tmp_path / "d.jsonl"
    f.write_text(jl(QA, {"instruction": "Summarise: " + "history of present illness " * 60, "output": "Stable."}))
    prepared = prepare(str(f), tiny_tokenizer, PrepareOptions(objective="sft", seq_len=64), str(tmp_path / "c"))
    assert prepared.stats["dropped_no_supervised_tokens"] == 1 and prepared.stats["samples"] == 1


def test_a_chat_dataset_needs_a_chat_template(tmp_path, tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    f = tmp_path / "d.jsonl"
    f.write_text(jl(QA))
    with pytest.raises(DataError, match=r"d.jsonl:1: the tokenizer has no chat template; set model.chat_template"):
        prepare(str(f), tok, PrepareOptions(objective="sft", seq_len=128), str(tmp_path / "c"))


def test_system_prompt_is_added_to_conversations_without_one(tmp_path, tiny_tokenizer):
    f = tmp_path / "d.jsonl"
    f.write_text(jl(QA))
    plain = prepare(str(f), tiny_tokenizer, PrepareOptions(objective="instruct", seq_len=128), str(tmp_path / "c"))
    with_system = prepare(
        str(f),
        tiny_tokenizer,
        PrepareOptions(objective="instruct", seq_len=128, system_prompt="You are a careful clinician."),
        str(tmp_path / "c"),
    )
    text = tiny_tokenizer.decode(with_system.rows([0])["input_ids"][0][: with_system.filled[0]])
    assert "careful clinician" in text
    assert with_system.filled[0] > plain.filled[0]
    assert with_system.stats["supervised_tokens"] == plain.stats["supervised_tokens"]  # the system turn is not learned
