"""bench/forgetting.py --smoke runs the real trainer end to end (base, `none` and ewc_replay, which
exercises both the penalty and the replay mix) on the bundled data and writes its table and
forgetting.json (shape only: no assertion on the numbers' size); the full list of settings, the
corpus split and the dictd reader on literals."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import corpora  # noqa: E402
import forgetting  # noqa: E402

SETTINGS = ["none", "replay 0.25", "ewc λ=1", "ewc_replay λ=1 0.05"]
RUN = ["none", "ewc_replay λ=1 0.05"]


def test_the_smoke_sweep_lists_every_setting():
    assert [s.name for s in forgetting.settings(forgetting.parse_args(["--smoke", "--out", "x"]))] == SETTINGS
    only = forgetting.parse_args(["--smoke", "--out", "x", "--only", "ewc_replay"])
    assert [s.name for s in forgetting.settings(only)] == RUN


@pytest.mark.distributed  # it trains
@pytest.mark.timeout(400)
def test_forgetting_bench_smoke(tmp_path):
    proc = subprocess.run([sys.executable, "bench/forgetting.py", "--smoke", "--only", "ewc_replay", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert rows[0].startswith("| setting | general loss start → end | forgetting | removed")
    assert [r.split(" | ")[0].lstrip("| ") for r in rows[2:]] == RUN
    assert "launcher: python launch/train.py (1 rank)" in proc.stdout and "target:" in proc.stdout

    report = json.loads((tmp_path / "forgetting.json").read_text())
    assert [r["setting"] for r in report["results"]] == RUN
    for r in report["results"]:
        for key in ("general_start", "general_end", "forgetting", "domain_start", "domain_end", "gain",
                    "step_time_s", "unphased_time_s", "peak_mem_gb", "step_time_vs_none", "peak_mem_vs_none_gb"):
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
        train, held = (set(forgetting.read_documents(tmp_path / "data" / f"{corpus}_{s}.txt")) for s in ("train", "heldout"))
        assert len(held) == d["heldout_docs"] and not train & held
    assert (tmp_path / report["base"]["output_dir"] / "hf" / "config.json").is_file()


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
    body = ("00-database-url\n   ftp://example\n"
            "Aerate \\A\"[\"e]r*ate\\, v. t. To supply with {air}; to a[\"e]rate water.\n   [1913 Webster]\n"
            "COTS\n\n   <software> commercial off-the-shelf.  See {commercial software}.\n\n   (2007-02-08)\n")
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
        f"COTS\t{b64(second)}\t{b64(len(raw) - second)}\n")
    assert corpora.dictd_number("BCy") == 4274  # the worked example in dictd_number's docstring
    n = corpora.write_corpus("toy", tmp_path / "toy.txt", min_chars=10, root=tmp_path)
    assert n == 2
    assert (tmp_path / "toy.txt").read_text() == (
        "Aerate , v. t. To supply with air; to aerate water.\n\n"
        "COTS <software> commercial off-the-shelf. See commercial software.\n")
