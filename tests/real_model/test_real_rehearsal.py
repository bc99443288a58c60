"""Rehearsal on the real chat model: launch/rehearse.py writes its own greedy answers as messages
records, and a continued-pretraining stage replays them as chat (regularizer.replay.objective=
instruct): only the answers and their end-of-turn are learned from the replay, while the stage's own
text is learned whole."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT

pytestmark = pytest.mark.real_model

PROMPTS = ["What is a river?", "Name a colour.", "Say hello in French."]
END_OF_TURN = "<|im_end|>\n"


def rehearse(*args):
    return subprocess.run(
        [sys.executable, "launch/rehearse.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_rehearse_writes_the_models_own_greedy_answers(reduced_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.forgetting import rehearsal

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n\n")
    out = tmp_path / "rehearsal.jsonl"
    proc = rehearse("--model", reduced_dir, "--prompts", prompts, "--out", out, "--max-new-tokens", 6, "--keep-cut-off")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [[m["role"] for m in r["messages"]] for r in records] == [["user", "assistant"]] * 2
    assert [r["messages"][0]["content"] for r in records] == PROMPTS[:2]
    # The answers are this model's greedy continuations, as the library generates them in-process.
    tok = AutoTokenizer.from_pretrained(str(reduced_dir))
    model = AutoModelForCausalLM.from_pretrained(str(reduced_dir), dtype=torch.float32)
    mine = list(rehearsal.answers(model, tok, PROMPTS[:2], 6))
    assert [r["messages"][1]["content"] for r in records] == [a.text for a in mine]
    assert all(len(a.answer_ids) == 6 and not a.finished for a in mine)  # a 2-layer copy never ends its turn

    # Without --keep-cut-off every such answer is dropped, and the tool says so instead of writing nothing
    # (in-process from here: the same main(), without another interpreter's imports).
    from launch.rehearse import main

    with pytest.raises(SystemExit, match=r"no answer ended within --max-new-tokens=6 \(2 cut off\)"):
        main(
            [
                "--model",
                str(reduced_dir),
                "--prompts",
                str(prompts),
                "--out",
                str(tmp_path / "none.jsonl"),
                "--max-new-tokens",
                "6",
            ]
        )
    assert not (tmp_path / "none.jsonl").exists() and not (tmp_path / "none.jsonl.tmp").exists()
    with pytest.raises(SystemExit, match="exists; pass --force"):
        main(["--model", str(reduced_dir), "--prompts", str(prompts), "--out", str(out)])
    with pytest.raises(SystemExit, match=r"--model nowhere: neither a model directory nor a known model"):
        main(["--model", "nowhere", "--prompts", str(prompts), "--out", str(tmp_path / "x.jsonl")])


def test_prompts_files_and_their_errors(tmp_path):
    from trainer.forgetting.rehearsal import read_prompts

    good = tmp_path / "p.jsonl"
    good.write_text(
        '{"prompt": "a"}\n\n{"instruction": "b", "input": "c"}\n'
        '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "d"}]}\n'
    )
    assert read_prompts(good) == ["a", "b\n\nc", "d"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no prompt in this record \(keys \['text'\]\)"):
        read_prompts(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl:1: not JSON"):
        read_prompts(broken)
    with pytest.raises(FileNotFoundError, match="no such prompts file"):
        read_prompts(tmp_path / "missing.txt")


def test_a_pretraining_stage_replays_chat_learning_only_the_answers(reduced_dir, real_tokenizer, tmp_path):
    from trainer.cli import load_config, register
    from trainer.data import prepare_data

    chats = tmp_path / "rehearsal.jsonl"
    answers = ["A river is flowing water.", "Blue.", "Bonjour!"]
    chats.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}) + "\n"
            for p, a in zip(PROMPTS, answers)
        )
    )
    register()
    cfg = load_config(
        [
            "stage=pretrain",
            f"model.name_or_path={reduced_dir}",
            "data.seq_len=128",
            f"data.cache_dir={tmp_path / 'cache'}",
            "regularizer=replay",
            f"regularizer.replay.path={chats}",
            "regularizer.replay.format=messages",
            "regularizer.replay.objective=instruct",
            f"output_dir={tmp_path / 'out'}",
        ]
    )
    data = prepare_data(cfg, real_tokenizer, preparer=True)
    replay = data.sources[data.names.index("replay")]
    rows = replay.rows(np.arange(len(replay)))
    learned = []
    for ids, labels in zip(rows["input_ids"], rows["labels"]):
        run = []
        for token, label in zip(ids.tolist(), labels.tolist()):
            if label != -100:
                run.append(token)
            elif run:
                learned.append(real_tokenizer.decode(run))
                run = []
        if run:
            learned.append(real_tokenizer.decode(run))
    assert sorted(learned) == sorted(a + END_OF_TURN for a in answers)  # never the prompts or the system turn
    main = data.sources[0]  # the stage's own text: every real token learned
    first = main.rows([0])
    assert int((first["labels"] != -100).sum()) >= int(main.filled[0]) - 1


def test_the_stages_batched_answers_are_the_models_own_one_at_a_time(reduced_dir):
    """regularizer.distill.prompts' generation (trainer/forgetting/rehearsal.py: prompts of different
    lengths left-padded into one batch, the end of turn <|im_end|> from the generation config) gives
    the real model's own greedy answers, as launch/rehearse.py makes them one prompt at a time."""
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.distributed.launcher import free_port
    from trainer.forgetting import rehearsal

    tok = AutoTokenizer.from_pretrained(str(reduced_dir))
    model = AutoModelForCausalLM.from_pretrained(str(reduced_dir), dtype=torch.float32).eval()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        engine = SimpleNamespace(module=model, device=torch.device("cpu"))
        batched = rehearsal.answers_on_engine(engine, tok, PROMPTS, 8, 0, 1, batch_size=3)
    finally:
        dist.destroy_process_group()
    alone = list(rehearsal.answers(model, tok, PROMPTS, 8))
    assert [a.answer_ids for a in batched] == [a.answer_ids for a in alone]
    assert [(a.prompt, a.text, a.finished) for a in batched] == [(a.prompt, a.text, a.finished) for a in alone]
