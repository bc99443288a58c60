"""bench/forgetting.py's real-model profile end to end on the depth-reduced SmolLM2 copy (its real
tokenizer and ChatML template): the base's greedy chat answers are generated, two fine-tunes run
through the real trainer, and every scored point is checked against scoring the kept exports and
their interpolations directly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import ROOT

pytestmark = [pytest.mark.real_model, pytest.mark.distributed, pytest.mark.timeout(900)]

sys.path.insert(0, str(ROOT / "bench"))


def test_real_profile_scores_each_fine_tune_and_its_interpolations(reduced_dir, tmp_path):
    import drift
    from safetensors.torch import load_file

    from trainer.forgetting.interpolation import interpolate

    proc = subprocess.run(
        [
            sys.executable,
            "bench/forgetting.py",
            "--model",
            str(reduced_dir),
            "--smoke",
            "--only",
            "replay,ewc_replay,combined",
            "--keep-runs",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "forgetting.json").read_text())
    assert report["profile"] == "real" and (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    answers = report["probe"]["answers"]
    assert len(answers) == 3 and all(a["answer"].strip() for a in answers), answers  # the base's own words
    assert "target:" in proc.stdout
    assert "| setting | α | general loss | chat loss (greedy) | chat loss (sampled) | KL from base" in proc.stdout
    # the base's answers sampled at temperature 1 are scored too; the rehearsal was checked disjoint from the probe
    assert report["probe"]["tokens"]["chat_sampled"] > 0 and report["base"]["chat_sampled"] > 0
    assert report["rehearsal"]["disjoint_from_probe"]["probe_prompts"] == 3

    points = {(p["setting"], p["alpha"]): p for p in report["points"]}
    groups = [p for p in report["points"] if p["method"] == "interpolation per group: none"]
    # the chat replay trained on the base's own answers (rehearsal), written as messages records
    rehearsal = [json.loads(line) for line in open(report["rehearsal"]["path"], encoding="utf-8")]
    assert len(rehearsal) == report["rehearsal"]["answers"] == 4
    assert all(
        [m["role"] for m in r["messages"]] == ["user", "assistant"] and r["messages"][1]["content"] for r in rehearsal
    )
    log = (tmp_path / "logs" / "replay_chat_0.25.log").read_text()
    assert "source replay (weight 0.25)" in log and report["rehearsal"]["path"] in log
    assert {("none", "1"), ("none", "0.5"), ("replay chat 0.25", "1"), ("replay chat 0.25", "0.5")} <= set(points)
    # chat replay with EWC whose Fisher is on the same chats (answers only), on the model's sampled labels
    log = (tmp_path / "logs" / "ewc_replay_chat_lam1_0.25_sampled.log").read_text()
    assert "EWC: Fisher from 1 reference batches (sampled labels)" in log
    assert ("ewc_replay chat λ=1 0.25 sampled", "1") in points
    # corrective targets on the domain rows with distillation toward the start on the same chats: the
    # start's top-k of both computed once before the first step
    log = (tmp_path / "logs" / "mft_tau0.5_and_distill_lam1.log").read_text()
    assert "regularizer.distill: the teacher's top-32 of" in log and report["rehearsal"]["path"] in log
    assert "regularizer.mft: the start's top-32 of 2 rows of source main computed once" in log
    assert ("mft τ=0.5 + distill λ=1", "1") in points
    assert len(groups) == 6  # {0.5, 1}^3 minus the two uniform corners
    ref = points[("none", "1")]
    assert ref["removed_by"]["kl"] == pytest.approx(0.0) and ref["kept"] in (None, pytest.approx(1.0))

    # The points are what scoring the exports (and their interpolations with the start) gives.
    model = drift.load_model(reduced_dir)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    probe = drift.Probe(**torch.load(report["probe"]["cache"], weights_only=True))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    assert drift.score(model, probe, pad) == pytest.approx(report["base"], abs=1e-6)
    assert report["base"]["kl"] == pytest.approx(0.0, abs=1e-6)
    tuned = load_file(str(tmp_path / "runs" / "none" / "hf" / "model.safetensors"))
    for alpha, key in ((1.0, "1"), (0.5, "0.5")):
        model.load_state_dict(interpolate(start, tuned, alpha, model.config.num_hidden_layers), strict=False)
        assert drift.score(model, probe, pad) == pytest.approx(points[("none", key)]["scores"], rel=1e-5)
    assert points[("none", "1")]["scores"]["kl"] > points[("none", "0.5")]["scores"]["kl"] > 0
