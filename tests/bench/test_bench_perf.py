"""The performance benchmarks' smoke modes run end to end and print their tables (no speed or memory
assertions: the numbers of a few steps on a shared CPU mean nothing). bench/data_prep.py is a
plain test; bench/throughput.py and bench/memory.py launch 2-rank DeepSpeed jobs (distributed)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from helpers import ROOT


def _bench(*args: str, timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.timeout(240)
def test_data_prep_smoke(tmp_path):
    out = tmp_path / "data_prep.json"
    proc = _bench("bench/data_prep.py", "--smoke", "--json", str(out), timeout=200)
    assert "| records | workers | tokens |" in proc.stdout and "anonymous memory" in proc.stdout, proc.stdout
    report = json.loads(out.read_text())
    results = report["results"]
    assert [(r["records"], r["workers"]) for r in results] == [(1000, 1), (1000, 2), (4000, 1), (4000, 2)]
    # the pool really ran (the smoke forces it on these small files) and made the same arrays
    assert [r["worker_peak_rss_mib"] > 0 for r in results] == [False, True, False, True]
    assert results[0]["arrays_sha256"] == results[1]["arrays_sha256"] != results[2]["arrays_sha256"]
    for r in results:
        assert r["samples"] > 0 and r["real_tokens"] > 0 and r["tokens_per_s"] > 0
        assert 0.9 < r["packing_efficiency"] <= 1.0
        assert r["mib_peak"]["RssAnon"] >= r["mib_before"]["RssAnon"]
    assert report["commit"] and report["date"]


@pytest.mark.distributed
@pytest.mark.timeout(420)
def test_throughput_smoke(tmp_path):
    """(a) ours packed, (b) the HF Trainer and (d) TRL's SFTTrainer packed, a few steps each. (c) differs
    from (a) by two overrides; its config is composed and its rows prepared in this run too, but it is
    not trained (CI time)."""
    out = tmp_path / "throughput.json"
    proc = _bench(
        "bench/throughput.py",
        "--smoke",
        "--systems",
        "a,b,d",
        "--out",
        str(tmp_path / "work"),
        "--json",
        str(out),
        timeout=400,
    )
    for text in (
        "(a) ours, packed",
        "(b) HF Trainer, padded",
        "(d) TRL SFTTrainer, packed",
        "tok/s vs (b)",
        "tok/s vs (d)",
        "target:",
        "target vs (d) TRL:",
    ):
        assert text in proc.stdout, proc.stdout
    report = json.loads(out.read_text())
    results = {r["system"]: r for r in report["results"]}
    assert sorted(results) == ["a", "b", "d"]
    for r in results.values():
        assert r["tokens_per_s"] > 0 and r["supervised_tokens_per_s"] > 0 and r["steps"] > 1
        assert len(r["peak_mem_gb_per_rank"]) == 2 and all(m > 0 for m in r["peak_mem_gb_per_rank"])
        assert math.isfinite(r["heldout_loss"]) and r["heldout_loss"] > 0 and r["train_loss_at_budget"] is not None
    assert results["a"]["slot_efficiency"] > results["b"]["slot_efficiency"]  # packing fills rows, padding does not
    assert results["d"]["slot_efficiency"] == 1.0  # padding-free: every position is a real token
    # (d) tokenized and packed the same conversations itself: the same tokens and supervised tokens as ours
    check = report["supervised_check"]
    assert check["d_set"] == check["a_set"] > 0
    assert check["d_set_tokens"] == check["a_set_tokens"] == report["data"]["tokens"]
    assert check["a_set"] < check["a_set_tokens"]  # prompts are not supervised
    assert 0 < results["d"]["supervised_tokens"] <= check["d_set"]
    assert {"speed_vs_trl_met", "mem_vs_trl_met", "loss_vs_trl_met"} <= set(report["verdict"])
    assert report["commit"] and report["date"] and report["load_avg_start"]


@pytest.mark.distributed
@pytest.mark.timeout(420)
def test_memory_smoke(tmp_path):
    """1 and 2 ranks trained; the AC, EWC, DPO, freezing and CE runs' overrides composed through the typed config."""
    out = tmp_path / "memory.json"
    proc = _bench("bench/memory.py", "--smoke", "--out", str(tmp_path / "work"), "--json", str(out), timeout=400)
    for text in ("1 rank", "2 ranks", "1 -> 2 ranks", "config composed, not run"):
        assert text in proc.stdout, proc.stdout
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["results"]] == ["1 rank", "2 ranks"]
    assert report["composed_only"] == [
        "AC full",
        "AC every_n (n=2)",
        "EWC",
        "freeze 1 blocks",
        "SFT on the pair documents",
        "DPO",
        "CE full logits V=49152 T=2048",
        "CE chunked V=49152 T=2048",
    ]
    pairs = [json.loads(line) for line in (tmp_path / "work" / "data" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 40 and all(p["chosen"] != p["rejected"] for p in pairs)
    for r in report["results"]:
        assert len(r["peak_mem_gb_per_rank"]) == r["ranks"] and r["step_time_s"] > 0
    assert "ws_drop_gb" in report["summary"]


@pytest.mark.timeout(400)
def test_the_gpu_profiles_are_checked_without_a_gpu(tmp_path):
    """bench/throughput.py --gpu --dry-run on this CPU machine: the ~1B bf16 flex-attention profile's
    data, every run's typed config and DeepSpeed config (bf16 on), the HF baseline's arguments and the
    MFU arithmetic, with nothing launched: the GPU path cannot rot while no GPU is lent. And every
    memory-benchmark run's config composes (bench/memory.py --dry-run)."""
    proc = _bench(
        "bench/throughput.py",
        "--gpu",
        "--dry-run",
        "--samples",
        "120",
        "--systems",
        "a,b,c,d",
        "--out",
        str(tmp_path / "tp"),
        timeout=300,
    )
    report = json.loads((tmp_path / "tp" / "throughput.json").read_text())
    assert report["dry_run"] and report["params"] > 900e6 and not (tmp_path / "tp" / "runs").exists()
    assert report["checked"]["a"] == {
        "precision": "bf16",
        "attn": "flex_attention",
        "packing": True,
        "bf16": True,
        "train_batch_size": 2,
    }
    assert report["checked"]["b"]["bf16"] and report["checked"]["c"]["packing"] is False
    steps_a = next(int(c.split("=")[1]) for c in report["commands"]["a"] if c.startswith("trainer.max_steps="))
    assert report["checked"]["d"] == {
        "bf16": True,
        "attn": "flex_attention",
        "batch_size": 1,
        "seq_len": 4096,
        "max_steps": steps_a,
        "gradient_checkpointing": False,
        "chat_template_marked": True,
    }
    assert "bench/trl_baseline.py" in report["commands"]["d"]
    assert (
        "trainer.loss_chunk_tokens=null" in report["commands"]["a"]
        and "trainer.loss_kernel=auto" in report["commands"]["a"]
    )
    assert report["peak_flops"]["NVIDIA H200"] == 989e12 and report["flops_per_token"] > 6 * 900e6
    proc = _bench("bench/memory.py", "--dry-run", "--out", str(tmp_path / "mem"), timeout=300)
    report = json.loads((tmp_path / "mem" / "memory.json").read_text())
    assert not report["results"] and len(report["composed_only"]) == 2 + 3 + 1 + 1 + 2 + 8, (
        proc.stdout
    )  # ws ac ewc freeze dpo ce


# ---- the benchmarks' arithmetic, on literal numbers ---------------------------------------------------


def _bench_module(name: str):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_memory_summary_ratios():
    memory = _bench_module("memory")
    run = dict(group="ac", ranks=2, unphased_s=0.10)
    results = [
        dict(run, name="1 rank", group="ws", ranks=1, peak_mem_gb=4.0, step_time_s=1.0),
        dict(run, name="2 ranks", group="ws", peak_mem_gb=3.0, step_time_s=2.0),
        dict(run, name="AC none", peak_mem_gb=5.0, step_time_s=10.0),
        dict(run, name="AC full", peak_mem_gb=4.0, step_time_s=13.0),
        dict(run, name="EWC", peak_mem_gb=5.5, step_time_s=10.5, unphased_s=0.30),
    ]
    s = memory.summarise(results, params=100_000_000)
    assert s["ws_peak_ratio"] == 0.75 and s["ws_drop_gb"] == 1.0
    assert abs(s["ws_expected_drop_gb"] - 20 * 1e8 / 2 / 2**30) < 1e-12  # 0.931 GiB
    assert s["ac_full_mem_ratio"] == 0.8 and s["ac_full_time_ratio"] == 1.3
    assert abs(s["ewc_own_time_s"] - 0.2) < 1e-12 and abs(s["ewc_own_time_share"] - 0.02) < 1e-12
    assert s["ewc_cost_target_met"] and abs(s["ewc_extra_gb"] - 0.5) < 1e-12
    dpo = memory.summarise(
        [
            dict(run, name="SFT on the pair documents", group="dpo", peak_mem_gb=4.0, step_time_s=10.0),
            dict(run, name="DPO", group="dpo", peak_mem_gb=4.2, step_time_s=11.0),
        ],
        params=1,
    )
    assert abs(dpo["dpo_mem_ratio"] - 1.05) < 1e-12 and abs(dpo["dpo_time_ratio"] - 1.1) < 1e-12
    assert dpo["dpo_mem_target_met"]
    ce = memory.summarise(
        [
            dict(run, name="CE full logits V=128256 T=8192", group="ce", peak_mem_gb=10.0, step_time_s=20.0),
            dict(run, name="CE chunked V=128256 T=8192", group="ce", peak_mem_gb=5.0, step_time_s=20.5),
        ],
        params=1,
    )
    assert ce["ce_V128256_T8192_mem_ratio"] == 0.5 and abs(ce["ce_V128256_T8192_time_ratio"] - 1.025) < 1e-12
    assert ce["ce_target_met"]


def test_throughput_loss_at_equal_supervised_tokens():
    throughput = _bench_module("throughput")
    steps = [
        {"supervised": 100, "loss": 4.0},
        {"supervised": 100, "loss": 3.0},
        {"supervised": 100, "loss": 2.0},
        {"supervised": 100, "loss": 1.0},
    ]
    # budget 400: the last quarter (300, 400] is step 4 only
    assert throughput.loss_at(steps, 400) == 1.0
    # budget 300: steps ending in (225, 300] -> step 3; step 4 ends past the budget
    assert throughput.loss_at(steps, 300) == 2.0
    # half the budget as the tail: steps 3 and 4, weighted equally
    assert throughput.loss_at(steps, 400, tail=0.5) == 1.5


def test_the_freezing_run_expects_16_bytes_a_frozen_parameter_and_counts_them_like_the_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    memory = _bench_module("memory")
    arch = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, tie_word_embeddings=False, **arch))
    below = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("model.layers.0.", "model.layers.1.")))
    assert memory.frozen_count(arch, 100, 2) == below + 100 * 32  # two blocks and the embeddings
    run = dict(group="ws", ranks=2, unphased_s=0.1)
    s = memory.summarise(
        [
            dict(run, name="2 ranks", peak_mem_gb=3.0, step_time_s=2.0),
            dict(run, name="freeze 6 blocks", group="freeze", peak_mem_gb=2.5, step_time_s=1.8),
        ],
        params=1,
        frozen=50_000_000,
    )
    assert s["freeze_drop_gb"] == 0.5 and abs(s["freeze_time_ratio"] - 0.9) < 1e-12
    assert abs(s["freeze_expected_drop_gb"] - 16 * 5e7 / 2 / 2**30) < 1e-12  # 0.373 GiB a rank
