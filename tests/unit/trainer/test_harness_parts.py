"""eval.harness's parts that need no model: the bundled instruction-following checks, the metric names,
the task checks, the config rules, and the head's continuation log-probs against full logits."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from data_pipeline.packing import IGNORE
from trainer import harness
from trainer.config import HarnessConfig
from trainer.objectives.head import target_logprobs

spec = importlib.util.spec_from_file_location("harness_utils", harness.BUNDLED_TASKS / "utils.py")
utils = importlib.util.module_from_spec(spec)
spec.loader.exec_module(utils)


@pytest.mark.parametrize(
    "kind, kwargs, good, bad",
    [
        ("lowercase", {}, "all small here.", "Not all small."),
        ("lowercase", {}, "all small 2.", "123."),  # as IFEval: no letters is not lowercase
        ("uppercase", {}, "ALL CAPS HERE.", "ALL CAPS here."),
        ("length_words", {"relation": "less than", "num": 4}, "one two three", "one two three four"),
        ("length_words", {"relation": "at least", "num": 3}, "one two three", "one two"),
        ("keywords", {"words": ["rain", "sun"]}, "Rain, then sun.", "rainy and sunny"),
        ("forbidden_words", {"words": ["water"]}, "Waterfalls are tall.", "Water is wet."),
        ("bullets", {"num": 2}, "* a\n* b", "* a\n* b\n* c"),
        ("json", {}, '```json\n{"answer": "x"}\n```', '{"answer": x}'),
        ("no_comma", {}, "No commas here.", "Yes, one."),
        ("ends_with", {"phrase": "Bye now."}, "Hello. bye NOW.", "Bye now. Hello."),
        ("json", {}, '```JSON\n{"a": 1}\n```', "```json\n{a: 1}\n```"),
    ],
)
def test_instruction_checks(kind, kwargs, good, bad):
    assert utils.check(kind, good, **kwargs)
    assert not utils.check(kind, bad, **kwargs)


def test_instruction_checks_reject_empty_answers_and_unknown_kinds():
    for kind in ("lowercase", "uppercase", "no_comma", "forbidden_words"):
        assert not utils.check(kind, "  ", words=["x"])
    with pytest.raises(ValueError, match="unknown check 'rhyme'"):
        utils.check("rhyme", "text")


def test_ifeval_scores_prompts_and_instructions():
    doc = {"checks": ["lowercase", "no_comma"], "kwargs": json.dumps([{}, {}])}
    assert utils.process_ifeval(doc, ["fine, thanks"]) == {"prompt_level_acc": False, "inst_level_acc": [True, False]}
    assert utils.inst_level_acc([[True, False], [True]]) == pytest.approx(2 / 3)


def test_bundled_task_data_is_well_formed():
    for name in ("general", "computing", "medical"):
        rows = utils._load(f"fullft_{name}")["test"]
        assert len(rows) >= 25
        assert all(len(r["choices"]) == 4 and 0 <= r["label"] < 4 for r in rows)
        assert all(len(set(r["choices"])) == 4 for r in rows), name
    for row in utils._load("fullft_ifeval")["test"]:
        for kind, kwargs in zip(row["checks"], json.loads(row["kwargs"])):
            utils.check(kind, "an answer", **kwargs)  # every check is known, its arguments complete


def test_metric_names():
    results = {
        "results": {
            "fullft_general": {"alias": "fullft_general", "acc,none": 0.5, "acc_stderr,none": 0.1},
            "gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": "N/A"},
        }
    }
    assert harness.metrics_of(results) == {
        "eval/harness/fullft_general/acc": 0.5,
        "eval/harness/fullft_general/acc_stderr": 0.1,
        "eval/harness/gsm8k/exact_match_strict-match": 0.25,
    }


def test_unknown_tasks_and_bad_include_paths_are_named(tmp_path):
    manager = harness.task_manager([])
    harness.check_tasks(["fullft_general", "fullft_ifeval"], manager)
    assert not manager.match_tasks(["hellaswag"])  # lm-eval's own tasks are indexed only when named
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) \['fullft_genral'\].*fullft_general"):
        harness.check_tasks(["fullft_genral"], manager)
    with pytest.raises(ValueError, match="is not a directory of lm-eval task YAML files"):
        harness.task_manager([str(tmp_path / "missing")])


def test_a_users_task_directory_is_found(tmp_path):
    (tmp_path / "mine.yaml").write_text((harness.BUNDLED_TASKS / "fullft_medical.yaml").read_text().replace(
        "task: fullft_medical", "task: my_medqa"))  # fmt: skip
    harness.check_tasks(["my_medqa"], harness.task_manager([str(tmp_path)]))


def test_chat_tasks_need_a_chat_template():
    class Plain:
        chat_template, name_or_path = None, "plain-tok"

    with pytest.raises(ValueError, match="has no chat template"):
        harness.check_tasks(["fullft_ifeval"], harness.task_manager([]), chat=True, tokenizer=Plain())


def test_config_rules():
    assert not HarnessConfig().enabled and HarnessConfig(chat_tasks=["fullft_ifeval"]).enabled
    with pytest.raises(ValueError, match="eval.harness: .*limit=0"):
        HarnessConfig(limit=0)
    with pytest.raises(ValueError, match=r"\['fullft_ifeval'\] listed in both tasks and chat_tasks"):
        HarnessConfig(tasks=["fullft_ifeval"], chat_tasks=["fullft_ifeval"])


@pytest.mark.parametrize("chunk", [None, 3])
def test_continuation_logprobs_equal_full_log_softmax(chunk):
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 7, 16), torch.randn(50, 16)
    targets = torch.randint(0, 50, (2, 7))
    targets[0, :3] = IGNORE
    targets[1, 4] = (hidden[1, 4] @ weight.T).argmax()  # a greedy one
    out = target_logprobs(hidden, weight, targets, chunk)
    full = torch.log_softmax(hidden @ weight.T, -1)
    keep = targets != IGNORE
    expected = full.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(out[..., 0][keep], expected[keep], atol=1e-5)
    assert torch.equal(out[..., 1][keep].bool(), (full.argmax(-1) == targets)[keep])
    assert out[1, 4, 1] == 1.0 and not out[~keep].any()
    # logits given directly (no chunked head installed)
    assert torch.allclose(target_logprobs(hidden @ weight.T, None, targets, chunk), out, atol=1e-5)
