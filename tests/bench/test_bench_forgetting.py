"""bench/forgetting.py --smoke runs the real trainer end to end (base, `none` and ewc_replay, which
exercises both the penalty and the replay mix) on the bundled data and writes its table and
forgetting.json (shape only: no assertion on the numbers' size); the full list of settings, the
corpus split and the dictd reader on literals."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import corpora  # noqa: E402
import forgetting  # noqa: E402

# The smoke's EWC runs on the Fisher of sampled labels (the data-label one is the tiny profile's default).
SETTINGS = [
    "none",
    "replay 0.25",
    "ewc λ=1 sampled",
    "ewc_replay λ=1 0.05 sampled",
    "distill λ=1",
    "mft τ=0.5",
    "freeze 1",
    "none LiNeS β=0.5",
]
RUN = ["none", "ewc_replay λ=1 0.05 sampled"]


def test_the_smoke_sweep_lists_every_setting():
    assert [s.name for s in forgetting.settings(forgetting.parse_args(["--smoke", "--out", "x"]))] == SETTINGS
    only = forgetting.parse_args(["--smoke", "--out", "x", "--only", "ewc_replay"])
    assert [s.name for s in forgetting.settings(only)] == RUN


@pytest.mark.distributed  # it trains
@pytest.mark.timeout(400)
def test_forgetting_bench_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, "bench/forgetting.py", "--smoke", "--only", "ewc_replay", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=360,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert rows[0].startswith("| setting | general loss start → end | forgetting | removed")
    assert [r.split(" | ")[0].lstrip("| ") for r in rows[2:]] == RUN
    assert "launcher: python launch/train.py (1 rank)" in proc.stdout and "target:" in proc.stdout

    report = json.loads((tmp_path / "forgetting.json").read_text())
    assert [r["setting"] for r in report["results"]] == RUN
    for r in report["results"]:
        for key in (
            "general_start",
            "general_end",
            "forgetting",
            "domain_start",
            "domain_end",
            "gain",
            "step_time_s",
            "unphased_time_s",
            "peak_mem_gb",
            "step_time_vs_none",
            "peak_mem_vs_none_gb",
        ):
            assert isinstance(r[key], float), (r["setting"], key, r[key])
        assert r["forgetting"] == pytest.approx(r["general_end"] - r["general_start"])
        assert r["gain"] == pytest.approx(r["domain_start"] - r["domain_end"])
        assert r["final_step"] == 3 and set(r["general_curve"]) == {"0", "3"}
    by = {r["regularizer"]: r for r in report["results"]}
    assert by["ewc_replay"]["ewc_penalty_end"] is not None and by["none"]["ewc_penalty_end"] is None
    assert by["ewc_replay"]["replay_token_fraction"] > 0
    assert report["results"][0]["step_time_vs_none"] == 0.0
    assert set(report["summary"]) >= {"best_setting", "forgetting_target_met", "ewc_cost_target_met"}
    assert report["launcher"].startswith("python") and report["table"] == "\n".join(rows)
    # the held-out splits are disjoint from the train splits, and the base is cached for a rerun
    for corpus in ("general", "domain"):
        d = report["data"][corpus]
        train, held = (
            set(forgetting.read_documents(tmp_path / "data" / f"{corpus}_{s}.txt")) for s in ("train", "heldout")
        )
        assert len(held) == d["heldout_docs"] and not train & held
    assert (tmp_path / report["base"]["output_dir"] / "hf" / "config.json").is_file()
    # the trainer's own interpolation sweep (regularizer.interpolation) gives each fine-tune's α points
    for r in report["results"]:
        rows = {row["alpha"]: row for row in r["interpolation"]["rows"]}
        assert sorted(rows) == [0.5, 1.0]
        assert rows[1.0]["eval/general/loss"] == pytest.approx(r["general_end"], rel=1e-6)
    assert [(p["setting"], p["alpha"]) for p in report["points"]] == [
        ("none", "1"),
        ("none", "0.5"),
        ("ewc_replay λ=1 0.05 sampled", "1"),
        ("ewc_replay λ=1 0.05 sampled", "0.5"),
    ]
    log = (tmp_path / "logs" / "ewc_replay_lam1_0.05_sampled.log").read_text()
    assert "EWC: Fisher from 1 reference batches (sampled labels)" in log
    assert report["points"][0]["removed"] == pytest.approx(0.0) or report["points"][0]["removed"] is None
    assert (tmp_path / "frontier.png").is_file() and "Pareto frontiers" in proc.stdout


def test_split_is_deterministic_and_reads_text_and_jsonl(tmp_path):
    text = tmp_path / "c.txt"
    text.write_text("".join(f"doc {i} line one\ndoc {i} line two\n\n" for i in range(30)))
    lines = tmp_path / "c.jsonl"
    lines.write_text("".join(json.dumps({"text": f"record {i}"}) + "\n\n" for i in range(30)))
    assert forgetting.read_documents(text)[3] == "doc 3 line one\ndoc 3 line two"
    assert len(forgetting.read_documents(lines)) == 30
    a = forgetting.split_corpus(text, "g", tmp_path / "a", max_docs=20, heldout_docs=3, seed=1)
    forgetting.split_corpus(text, "g", tmp_path / "b", max_docs=20, heldout_docs=3, seed=1)
    assert (a["train_docs"], a["heldout_docs"]) == (17, 3)
    for split in ("train", "heldout"):
        assert (tmp_path / "a" / f"g_{split}.txt").read_text() == (tmp_path / "b" / f"g_{split}.txt").read_text()
    j = forgetting.split_corpus(lines, "d", tmp_path / "j", max_docs=100, heldout_docs=100, seed=1)
    assert (j["train_docs"], j["heldout_docs"]) == (24, 6)  # a small corpus keeps 4/5 for training
    assert all(json.loads(line) for line in (tmp_path / "j" / "d_train.jsonl").read_text().splitlines())


def test_dictd_reader_dedupes_entries_and_strips_markup(tmp_path):
    body = (
        "00-database-url\n   ftp://example\n"
        'Aerate \\A"["e]r*ate\\, v. t. To supply with {air}; to a["e]rate water.\n   [1913 Webster]\n'
        "COTS\n\n   <software> commercial off-the-shelf.  See {commercial software}.\n\n   (2007-02-08)\n"
    )
    raw = body.encode()
    first, second = raw.index(b"Aerate"), raw.index(b"COTS")

    def b64(n: int) -> str:
        digits = ""
        while True:
            digits = corpora._B64[n % 64] + digits
            n //= 64
            if not n:
                return digits

    (tmp_path / "toy.dict.dz").write_bytes(gzip.compress(raw))
    (tmp_path / "toy.index").write_text(
        f"00-database-url\t{b64(0)}\t{b64(first)}\n"
        f"Aerate\t{b64(first)}\t{b64(second - first)}\naeration\t{b64(first)}\t{b64(second - first)}\n"
        f"COTS\t{b64(second)}\t{b64(len(raw) - second)}\n"
    )
    assert corpora.dictd_number("BCy") == 4274  # the worked example in dictd_number's docstring
    n = corpora.write_corpus("toy", tmp_path / "toy.txt", min_chars=10, root=tmp_path)
    assert n == 2
    assert (tmp_path / "toy.txt").read_text() == (
        "Aerate , v. t. To supply with air; to aerate water.\n\n"
        "COTS <software> commercial off-the-shelf. See commercial software.\n"
    )


def test_fortune_files_become_one_document_per_entry(tmp_path):
    (tmp_path / "wisdom").write_text(
        "A penny saved is a penny earned, they say, and\n\tthey are right.\n"
        "\t\t-- B. Franklin\n%\nShort.\n%\nThe last entry has no\ntrailing percent sign at all.\n"
    )
    docs = corpora.fortunes(tmp_path, files=("wisdom",), min_chars=20)
    assert docs == [
        "A penny saved is a penny earned, they say, and\nthey are right.\n-- B. Franklin",
        "The last entry has no\ntrailing percent sign at all.",
    ]
    with pytest.raises(FileNotFoundError, match="apt-get install -y .*fortunes"):
        corpora.fortunes(tmp_path, files=("love",))


def test_profiles_fill_what_the_command_line_leaves_out():
    real = forgetting.parse_args(["--model", "smollm2_135m", "--general", "g", "--domain", "d", "--out", "x"])
    assert (real.steps, real.lr, real.micro_batch, real.alphas, real.task_limit) == (20, 1e-4, 1, [0.75], 100)
    # the default: the contenders beside plain tuning (chat replay needs the rehearsal file)
    assert [s.name for s in forgetting.settings(real, rehearsal="/r.jsonl")] == [
        "none",
        "replay chat 0.25",
        "distill λ=1",
        "mft τ=0.5",
    ]
    assert [s.dirname for s in forgetting.settings(real, rehearsal="/r.jsonl")][1:] == [
        "replay_chat_0.25",
        "distill_lam1",
        "mft_tau0.5",
    ]
    chat = forgetting.settings(real, rehearsal="/r.jsonl")
    distill = next(x for x in chat if x.family == "distill")
    assert "regularizer.distill.data=/r.jsonl" in distill.overrides and distill.method.endswith("own chat answers")
    both = forgetting.parse_args(
        ["--model", "m", "--general", "g", "--domain", "d", "--out", "x", "--only", "combined", "--train-seed", "7"]
    )
    combined = next(x for x in forgetting.settings(both, rehearsal="/r.jsonl") if x.family == "combined")
    assert combined.name == "mft τ=0.5 + distill λ=1" and combined.family == "combined"
    assert forgetting.settings(both)[-1].dirname == "mft_tau0.5_and_distill_lam1"
    assert all(s.dirname.isascii() for s in forgetting.settings(real))
    assert {"regularizer.mft.tau=0.5", "regularizer.distill.weight=1.0", "regularizer.distill.data=/r.jsonl"} <= set(
        combined.overrides
    )
    data = {"general": {"train": "g.txt"}, "domain": {"train": "d.txt"}}
    assert "trainer.seed=7" in forgetting.real_overrides(both, data, Path("m"), combined, Path("o"))
    assert (both.seed, real.train_seed) == (1234, 1234)
    tiny = forgetting.settings(forgetting.parse_args(["--out", "x", "--general", "g", "--domain", "d"]))
    lines = next(x for x in tiny if x.family == "lines")  # tiny: α 0, 0.25, 0.5 (α + β <= 1) as LiNeS (α, 0.5)
    assert "regularizer.interpolation.alphas=[0,0.25,0.5]" in lines.overrides
    given = forgetting.parse_args(
        [
            "--model",
            "m",
            "--general",
            "g",
            "--domain",
            "d",
            "--out",
            "x",
            "--steps",
            "7",
            "--lr",
            "3e-5",
            "--alphas",
            "0.5",
        ]
    )
    assert (given.steps, given.lr, given.alphas) == (7, 3e-5, [0.5])
    assert forgetting.parse_args(["--out", "x", "--general", "g", "--domain", "d"]).steps == 200  # tiny profile
    # a setting's own value of a key replaces the common one (Hydra refuses two)
    assert forgetting.merged(
        ["trainer.optim.lr=1", "+eval.sets.a=p", "x=1"], ["trainer.optim.lr=2", "eval.sets.a=q"]
    ) == [
        "x=1",
        "trainer.optim.lr=2",
        "eval.sets.a=q",
    ]
    assert len(forgetting.group_grid([0.25, 0.5, 1.0])) == 24  # 27 combinations minus the 3 uniform ones
    # re-warming, the sampled-label Fisher and chat replay (the real profile's rehearsal file) as settings
    study = forgetting.parse_args(
        [
            "--model",
            "m",
            "--general",
            "g",
            "--domain",
            "d",
            "--out",
            "x",
            "--lower-lrs",
            "",
            "--replay-ratios",
            "",
            "--warmups",
            "0",
            "--chat-replay-ratios",
            "0.25",
            "--fisher-labels",
            "data,sampled",
            "--lams",
            "0.1",
            "--ewc-replay-ratio",
            "0",
            "--chat-ewc-replay-ratio",
            "0.1",
            "--only",
            "replay,ewc,ewc_replay,distill,mft,freeze",
        ]
    )
    runs = forgetting.settings(study, Path("r.jsonl"))
    assert [s.name for s in runs] == [
        "none",
        "none warmup=0",
        "replay chat 0.25",
        "ewc λ=0.1",
        "ewc λ=0.1 sampled",
        "ewc_replay chat λ=0.1 0.1",
        "distill λ=1",
        "mft τ=0.5",
        "freeze 6",
    ]
    # the chats are the Fisher's data too: fisher_data unset, so the replay's path and objective
    assert (
        "regularizer.ewc.fisher_data=null" in runs[5].overrides
        and "regularizer.replay.objective=instruct" in runs[5].overrides
    )
    assert [forgetting.method_of(s) for s in runs] == [
        ("plain (peak LR)", "default lr"),
        ("plain (warmup)", "warmup 0"),
        ("replay (own chat answers)", "0.25"),
        ("ewc", "0.1"),
        ("ewc sampled", "0.1"),
        ("ewc_replay chat", "0.1 0.1"),
        ("distill (KL to the start) on own chat answers", "1"),
        ("mft (corrective targets)", "0.5"),
        ("freeze first blocks", "6"),
    ]
    assert runs[2].overrides == [
        "regularizer.replay.path=r.jsonl",
        "regularizer.replay.format=messages",
        "regularizer.replay.objective=instruct",
        "regularizer.replay.ratio=0.25",
    ]
    assert "regularizer.ewc.fisher_labels=sampled" in runs[4].overrides
    assert [s.name for s in forgetting.settings(study)][2:4] == ["ewc λ=0.1", "ewc λ=0.1 sampled"]  # no rehearsal file


def test_relate_judges_only_the_measures_that_plain_fine_tuning_forgot():
    base = {"general": 4.0, "chat": 0.6, "chat_sampled": 2.0, "kl": 0.0, "domain": 4.0}
    none = forgetting.drift_point(
        "none", "plain", "", "1", {"general": 3.9, "chat": 0.8, "chat_sampled": 2.4, "kl": 0.2, "domain": 3.0}
    )
    half = forgetting.drift_point(
        "none",
        "interp",
        "α 0.5",
        "0.5",
        {"general": 3.8, "chat": 0.61, "chat_sampled": 2.1, "kl": 0.05, "domain": 3.05},
    )
    forgetting.relate([none, half], base, none["scores"])
    assert none["removed"] is None or none["removed"] == pytest.approx(0.0)
    assert half["removed_by"]["general"] is None  # general text got better under plain fine-tuning: not judged
    assert half["removed_by"]["chat"] == pytest.approx(0.95) and half["removed_by"]["chat_sampled"] == pytest.approx(
        0.75
    )
    assert half["removed"] == pytest.approx(0.75)  # the smallest share over the judged measures: sampled chat
    assert half["removed_by"]["kl"] == pytest.approx(0.75)
    assert half["kept"] == pytest.approx(0.95) and not half["meets_target"]
    table = forgetting.real_table([none, half], base)
    assert "| none | 0.5 | 3.800 | 0.610 | 2.100 | 0.0500 | 3.050 | – / 95% / 75% / 75% | 75% | 95% | no |" in table


def test_rehearsal_is_checked_disjoint_from_what_the_probe_scores():
    def rec(prompt):
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "a"}]}

    probe = ["Why is the sky blue?", "How do I boil an egg?"]
    held = ["A held-out document about the tides of the moon."]
    ok = forgetting.check_disjoint([rec("Give this text a short title.\n\nSome train document.")], probe, held)
    assert ok == {"rehearsal_prompts": 1, "probe_prompts": 2, "heldout_docs": 1}
    with pytest.raises(SystemExit, match="contains the probe prompt 'Why is the sky blue"):
        forgetting.check_disjoint([rec("Explain this:  why is the SKY blue?")], probe, held)
    with pytest.raises(SystemExit, match="contains the held-out document"):
        forgetting.check_disjoint([rec("Title: a held-out document about the tides of the moon.")], probe, held)


def test_pareto_frontier_and_best_trade_off(tmp_path):
    import frontier

    pts = [
        {"method": "m", "knob": k, "removed": r, "kept": g}
        for k, r, g in [
            ("a", 0.1, 1.0),
            ("b", 0.5, 0.9),
            ("c", 0.4, 0.8),
            ("d", 0.9, 0.5),
            ("e", 0.5, 0.95),
            ("f", None, 1.0),
        ]
    ]
    assert [p["knob"] for p in frontier.pareto(pts)] == ["a", "e", "d"]
    # closest to the corner: min(removed/0.9, kept/0.95) is 0.556 for e (and for b, which e dominates), 0.526 for d
    assert frontier.best_trade_off(pts, 0.9, 0.95)["knob"] == "e"
    pts.append({"method": "n", "knob": "g", "removed": 0.92, "kept": 0.96})
    assert frontier.best_trade_off(pts, 0.9, 0.95)["knob"] == "g"
    assert set(frontier.frontiers(pts)) == {"m", "n"}
    png = frontier.plot(pts, tmp_path / "f.png", "title", 0.9, 0.95)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_top_k_kl_is_exact_with_the_whole_vocabulary_and_a_lower_bound_below_it():
    import drift
    import torch

    torch.manual_seed(0)
    p = torch.log_softmax(torch.randn(5, 50) * 2, -1)
    q = torch.log_softmax(torch.randn(5, 50) * 2, -1)
    full = (p.exp() * (p - q)).sum(-1)
    top = p.topk(50, -1)
    assert torch.allclose(drift.kl_topk(top.indices, top.values, q), full, atol=1e-5)
    for k in (1, 5, 20):
        top = p.topk(k, -1)
        approx = drift.kl_topk(top.indices, top.values, q)
        assert (approx <= full + 1e-6).all() and (approx >= -1e-6).all()
    top = p.topk(5, -1)
    assert torch.allclose(drift.kl_topk(top.indices, top.values, p), torch.zeros(5), atol=1e-6)
