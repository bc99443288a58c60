"""Unit: preference pairs, from records to packed rows. The three record shapes, the bad-input
matrix (file:line in every error, data.on_error=skip counts), over-long pairs per data.overlong,
and the packed layout: whole pairs, chosen then rejected, each document with its own positions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_pipeline.packing import IGNORE
from data_pipeline.preference import Pair, encode_pair, fit_pair, is_preference_source, normalise_pair, write_pairs
from data_pipeline.prepare import PrepareOptions, prepare
from data_pipeline.sources import DataError, Record
from trainer.config import bundled_path

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731


def _pair(data) -> Pair:
    return normalise_pair(Record(data, "prefs.jsonl:7"))


def test_text_pairs_stay_text():
    p = _pair({"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"})
    assert not p.conversational and (p.prompt, p.chosen, p.rejected) == ("Q: 2+2?", " 4", " 5")


def test_conversational_pairs_and_string_completions_of_a_message_prompt():
    p = _pair({"prompt": [U("hi")], "chosen": [A("hello")], "rejected": [A("go away")]})
    assert p.conversational and p.chosen == [A("hello")]
    q = _pair({"prompt": [U("hi")], "chosen": "hello", "rejected": "go away"})
    assert q == p


def test_a_text_prompt_with_message_completions_becomes_a_user_turn():
    p = _pair({"prompt": "hi", "chosen": [A("hello")], "rejected": [A("go away")]})
    assert p.prompt == [U("hi")]


def test_whole_conversations_share_their_prompt_prefix():
    """HH-RLHF style: the prompt is the common prefix, cut back to end before the assistant turn."""
    shared = [U("I have a cough."), A("How long?"), U("Two weeks.")]
    p = _pair({"chosen": shared + [A("See a doctor if it lasts three weeks.")], "rejected": shared + [A("Ignore it.")]})
    assert p.prompt == shared and p.chosen == [A("See a doctor if it lasts three weeks.")]
    assert p.rejected == [A("Ignore it.")]
    # The completions begin with the same words of the same assistant turn: the prompt still ends
    # before that turn (the common prefix of messages, not of characters).
    q = _pair({"chosen": [U("x"), A("yes, because a")], "rejected": [U("x"), A("yes, because b")]})
    assert q.prompt == [U("x")]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical"),
        ({"prompt": [U("q")], "chosen": [A("a")], "rejected": [A("a")]}, "identical"),
        ({"chosen": [U("q"), A("a")], "rejected": [U("q"), A("a")]}, "identical"),
        ({"chosen": "a", "rejected": "b"}, "field 'prompt' is missing"),
        ({"prompt": None, "chosen": "a", "rejected": "b"}, "field 'prompt' is missing"),
        ({"chosen": [A("a")], "rejected": [A("b")]}, "the prompt is missing"),
        ({"chosen": [U("q"), A("a")], "rejected": [U("other"), A("b")]}, "the prompt is missing"),
        ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "field 'prompt' is empty"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "field 'chosen' is empty"),
        ({"prompt": [U("q"), A("a")], "chosen": [A("b")], "rejected": [A("c")]}, "ends with an assistant turn"),
        ({"prompt": [U("q")], "chosen": [U("b")], "rejected": [A("c")]}, "must start with an assistant turn"),
        ({"prompt": [U("q")], "chosen": [A("  ")], "rejected": [A("c")]}, "no non-empty assistant turn"),
        ({"prompt": [{"role": "robot", "content": "q"}], "chosen": "b", "rejected": "c"}, "prompt[0] must have 'role'"),
        ({"prompt": "q", "chosen": 3, "rejected": "c"}, "field 'chosen' must be a non-empty list"),
        ({"instruction": "q", "output": "a"}, "needs 'chosen' and 'rejected'"),
        ({"__error__": "invalid JSON (Expecting value)"}, "invalid JSON"),
    ],
)
def test_bad_pairs_name_the_line_and_the_problem(data, message):
    with pytest.raises(DataError, match="prefs.jsonl:7") as ex:
        _pair(data)
    assert message in str(ex.value)


def test_fit_pair_by_hand():
    assert fit_pair(10, 30, 8, 40) == 12  # the docstring's example: chosen cut to 12, rejected kept
    assert fit_pair(10, 30, 30, 40) == 10  # both cut to 10: 20 + 10 + 10 = 40
    assert fit_pair(19, 5, 5, 40) == 1  # room 2: one token each
    assert fit_pair(20, 5, 5, 40) is None  # the prompt twice fills the row


def test_write_pairs_layout_by_hand(tmp_path):
    """Pair 0 (prompt [1 2], chosen [3 4], rejected [5]) and pair 1 (prompt [6], chosen [7], rejected
    [8 9]) in one row of 16: documents 0..3 side by side, positions restarting, completions supervised
    except where a document starts."""
    rows, most = write_pairs(tmp_path, [([1, 2], [3, 4], [5]), ([6], [7], [8, 9])], 16, packing=True, pad_id=0)
    assert (rows, most) == (1, 4)
    ids, sup = np.load(tmp_path / "input_ids.npy"), np.load(tmp_path / "supervised.npy")
    pos, doc = np.load(tmp_path / "position_ids.npy"), np.load(tmp_path / "document.npy")
    # longest pair first (best-fit decreasing): pair 0 has 7 tokens, pair 1 has 5
    assert ids[0].tolist() == [1, 2, 3, 4, 1, 2, 5, 6, 7, 6, 8, 9, 0, 0, 0, 0]
    assert doc[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, -1, -1, -1, -1]
    assert pos[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 1, 2, 0, 1, 2, 3]
    assert sup[0].astype(int).tolist() == [0, 0, 1, 1, 0, 0, 1, 0, 1, 0, 1, 1, 0, 0, 0, 0]
    assert np.load(tmp_path / "filled.npy").tolist() == [12]
    rows, most = write_pairs(tmp_path, [([1, 2], [3, 4], [5]), ([6], [7], [8, 9])], 16, packing=False, pad_id=0)
    assert (rows, most) == (2, 2)


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_prepare_counts_overlong_pairs_and_keeps_pairs_whole(tmp_path, tiny_tokenizer):
    long = "word " * 200
    src = _jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": [U("Is it safe?")], "chosen": [A("Ask your doctor.")], "rejected": [A("Yes, always.")]}] * 5
        + [{"prompt": [U("Tell me more.")], "chosen": [A(long)], "rejected": [A("No.")]}],
    )
    opts = dict(objective="dpo", seq_len=64)
    cut = prepare(src, tiny_tokenizer, PrepareOptions(**opts, overlong="truncate"), str(tmp_path / "c"))
    assert cut.stats["truncated_overlong"] == 1 and cut.stats["pairs"] == 6
    dropped = prepare(src, tiny_tokenizer, PrepareOptions(**opts, overlong="drop"), str(tmp_path / "c"))
    assert dropped.stats["dropped_overlong"] == 1 and dropped.stats["pairs"] == 5
    rows = cut.rows(np.arange(len(cut)))
    for r in range(len(cut)):  # every row holds whole pairs: an even number of documents, each supervised
        docs = sorted(set(rows["document"][r].tolist()) - {-1})
        assert docs == list(range(len(docs))) and len(docs) % 2 == 0
        for d in docs:
            labels = rows["labels"][r][rows["document"][r] == d]
            assert labels[0] == IGNORE and (labels != IGNORE).any()
    assert cut.is_preference and cut.documents_per_row >= 2


def test_prepare_skips_and_counts_bad_pairs_or_stops_at_the_first(tmp_path, tiny_tokenizer):
    src = _jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "q", "chosen": "a", "rejected": "b"},
            {"prompt": "q", "chosen": "same", "rejected": "same"},
            {"chosen": "a", "rejected": "b"},
        ],
    )
    with pytest.raises(DataError, match=r"p\.jsonl:2: 'chosen' and 'rejected' are identical(.|\n)*data.on_error=skip"):
        prepare(src, tiny_tokenizer, PrepareOptions(objective="dpo", seq_len=64), str(tmp_path / "c"))
    p = prepare(src, tiny_tokenizer, PrepareOptions(objective="dpo", seq_len=64, on_error="skip"), str(tmp_path / "c"))
    assert p.stats["skipped_malformed"] == 2 and p.stats["pairs"] == 1


def test_text_pairs_end_in_eos_and_chat_pairs_in_the_template_end(tiny_tokenizer):
    prompt, chosen, rejected = encode_pair(
        tiny_tokenizer, _pair({"prompt": "Is it safe?", "chosen": " Ask.", "rejected": " Yes."})
    )
    assert chosen[-1] == rejected[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(prompt + chosen, skip_special_tokens=True).replace(" ", "") == "Isitsafe?Ask."
    prompt, chosen, _ = encode_pair(
        tiny_tokenizer, _pair({"prompt": [U("Is it safe?")], "chosen": [A("Ask.")], "rejected": [A("Yes.")]})
    )
    text = tiny_tokenizer.decode(prompt + chosen)
    full = tiny_tokenizer.apply_chat_template([U("Is it safe?"), A("Ask.")], tokenize=False)
    assert text.replace(" ", "") == full.replace(" ", "")


def test_the_bundled_preference_sets_prepare_cleanly(tmp_path, tiny_tokenizer):
    for name in ("medical_prefs.jsonl", "medical_prefs_heldout.jsonl"):
        assert is_preference_source(bundled_path(name))
        p = prepare(bundled_path(name), tiny_tokenizer, PrepareOptions(objective="dpo", seq_len=256), str(tmp_path))
        assert p.stats["records"] == p.stats["pairs"] and not p.stats.get("truncated_overlong")
    assert not is_preference_source(bundled_path("medical_qa.jsonl"))


def test_a_prompt_that_merges_into_its_completion_is_refused(tiny_tokenizer):
    """ "a" + "b" tokenizes as one token: no prompt token survives to condition on, and the completion's
    first token could never be scored. An error naming the line, not a silently shorter completion."""
    with pytest.raises(DataError, match=r"prefs.jsonl:7: the prompt's tokens merge into the completion's"):
        encode_pair(tiny_tokenizer, _pair({"prompt": "a", "chosen": "b", "rejected": "c"}))
