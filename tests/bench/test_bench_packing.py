"""bench/packing.py --smoke runs end to end and prints its table (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.timeout(300)
def test_packing_bench_smoke(tmp_path):
    out = tmp_path / "packing.json"
    proc = subprocess.run(
        [sys.executable, "bench/packing.py", "--smoke", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for text in (
        "seq_len 2048",
        "seq_len 4096",
        "efficiency",
        "steps/epoch",
        "ours: best-fit-decreasing",
        "greedy first-fit",
        "naive padding",
    ):
        assert text in proc.stdout, proc.stdout
    assert "trl pack_dataset" in proc.stdout or "skipping the TRL rows" in proc.stdout
    results = json.loads(out.read_text())["results"]
    ours = [r for r in results if r["method"].startswith("ours")]
    assert [r["seq_len"] for r in ours] == [2048, 4096]
    assert all(0 < r["efficiency"] <= 1 for r in results)


def _run_without_trl(*args: str) -> subprocess.CompletedProcess:
    # sys.modules["trl"] = None makes `import trl` raise ImportError, as on a `.[dev]` install.
    code = (
        "import runpy, sys; sys.modules['trl'] = None; "
        f"sys.argv = ['bench/packing.py', *{list(args)!r}]; runpy.run_path('bench/packing.py', run_name='__main__')"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240)


@pytest.mark.timeout(300)
def test_smoke_skips_trl_when_missing_and_full_run_asks_for_the_extra():
    smoke = _run_without_trl("--smoke")
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    assert "skipping the TRL rows" in smoke.stdout and "ours: best-fit-decreasing" in smoke.stdout
    full = _run_without_trl("--samples", "10")
    assert full.returncode != 0
    assert "pip install -e .[bench]" in full.stderr
