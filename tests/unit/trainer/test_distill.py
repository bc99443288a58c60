"""regularizer.distill's configuration and its rows (trainer/forgetting/distill.py). The KL kernel:
test_distill_kernel.py; on 2 ZeRO-3 ranks (stored teacher, penalty against full logits, resume):
tests/distributed/test_training.py."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from trainer.cli import load_config
from trainer.forgetting.distill import DistillSource

BASE = ["+exp=medical_qa", "output_dir=/tmp/x"]


def test_the_config_says_what_is_missing_and_what_cannot_combine():
    on = ["regularizer.distill.weight=0.5"]
    with pytest.raises(SystemExit, match=r"regularizer.distill.weight=0.5 needs sequences to distill on"):
        load_config(BASE + on)
    cfg = load_config(BASE + on + ["regularizer.distill.data=/g.txt"])
    assert cfg.regularizer.distill.enabled and cfg.regularizer.distill.top_k == 32
    assert not load_config(BASE).regularizer.distill.enabled
    with pytest.raises(SystemExit, match=r"weight >= 0, rows >= 1 and top_k >= 1 are required .*top_k=0"):
        load_config(BASE + on + ["regularizer.distill.data=/g.txt", "regularizer.distill.top_k=0"])
    with pytest.raises(SystemExit, match="regularizer.distill with stage=dpo"):
        load_config(["stage=dpo", "data=medical_prefs", "output_dir=/tmp/x"] + on + ["regularizer.distill.data=/g"])


def test_own_answers_config_excludes_a_file_and_another_teacher():
    on = ["regularizer.distill.weight=1", "regularizer.distill.prompts=/p.txt"]
    cfg = load_config(BASE + on)
    d = cfg.regularizer.distill
    assert d.enabled and d.prompts == "/p.txt" and d.answer_tokens == 256 and not d.keep_cut_off
    with pytest.raises(SystemExit, match=r"prompts=/p.txt and data=/g.txt are both set"):
        load_config(BASE + on + ["regularizer.distill.data=/g.txt"])
    with pytest.raises(SystemExit, match=r"prompts with teacher=/t: .*launch/rehearse.py --model <teacher>"):
        load_config(BASE + on + ["regularizer.distill.teacher=/t"])
    with pytest.raises(SystemExit, match=r"answer_tokens >= 1 and answer_batch_size >= 1 .*answer_tokens=0"):
        load_config(BASE + on + ["regularizer.distill.answer_tokens=0"])


class _Rows:
    """A prepared source's interface, 10 rows of 6 tokens."""

    def __init__(self, n: int = 10) -> None:
        self.filled = np.full(n, 6)
        self.input_ids = np.arange(n * 6).reshape(n, 6)

    def __len__(self) -> int:
        return len(self.filled)

    def rows(self, idx):
        ids = self.input_ids[np.asarray(idx)]
        return {"input_ids": ids, "labels": ids, "position_ids": np.tile(np.arange(6), (len(idx), 1))}


def test_the_rows_cover_every_row_once_an_epoch_split_over_ranks_and_replay_exactly():
    src, teacher = _Rows(), (np.zeros((10, 5, 3), np.int32), np.zeros((10, 5, 3), np.float32))

    def source(rank):
        return DistillSource(SimpleNamespace(rows_per_step=4), src, teacher, 2, 0.5, rank, 2, seed=1)

    ranks = [source(0), source(1)]
    # positions (step x 2 ranks + rank) x 2 rows + j: steps 0-1 of both ranks and step 2 of rank 0 are one epoch
    epoch = [i for step in (0, 1) for r in ranks for i in r.indices(step)] + ranks[0].indices(2)
    assert sorted(epoch) == list(range(10))  # every row once
    assert source(0).indices(7) == ranks[0].indices(7)  # a fresh source (a resume) gives the same rows
    assert source(0).indices(5) != source(0).indices(0)  # the next epoch has an order of its own
    batch = ranks[1].batch(3)
    assert batch["teacher_ids"].shape == (2, 5, 3) and batch["teacher_ids"].dtype == torch.int64
    assert float(batch["distill_weight"]) == 0.5 and batch["row"].tolist() == ranks[1].indices(3)


def _word_tokenizer(order):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(order)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_another_teacher_must_share_the_vocabulary_token_for_token(tmp_path):
    from transformers import LlamaConfig

    from trainer.forgetting.distill import check_teacher

    ours, config = _word_tokenizer(["a", "b", "[UNK]"]), LlamaConfig(vocab_size=3)

    def teacher(name, order, vocab):
        LlamaConfig(vocab_size=vocab).save_pretrained(tmp_path / name)
        _word_tokenizer(order).save_pretrained(tmp_path / name)
        return str(tmp_path / name)

    check_teacher(teacher("same", ["a", "b", "[UNK]"], 3), ours, config)  # a teacher of the same family
    with pytest.raises(ValueError, match=r"predicts over 5 tokens and the model trained here over 3"):
        check_teacher(teacher("bigger", ["a", "b", "[UNK]"], 5), ours, config)
    with pytest.raises(ValueError, match=r"maps tokens to other ids .*\('a', 0\)"):
        check_teacher(teacher("shuffled", ["b", "a", "[UNK]"], 3), ours, config)
    with pytest.raises(FileNotFoundError, match="regularizer.distill.teacher='/nowhere' is not a local"):
        check_teacher("/nowhere", ours, config)
