"""Distributed tier: a finished run exits 0, also on a loaded machine.

A run that trained and exported used to die at interpreter exit now and then under CPU load:
"terminate called without an active exception", exit -6, and torchrun (and Slurm) marked the job
failed. The cause: gloo's worker threads outlive the process group (DeepSpeed's engine keeps the
groups referenced) and, when one drops a tensor while the interpreter finalises, it must take the
GIL and Python ends the thread inside C++ (trainer/distributed/group.py). The process now ends
through trainer.distributed.finish, as launch/train.py does. Here 20 two-rank processes end that
way, four at a time, beside two busy processes, and every one must exit 0 without an abort.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import BIN, ROOT, THREADS
from trainer.distributed import free_port

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

PROBE = ROOT / "tests" / "distributed" / "teardown_probe.py"
FINISHES, AT_ONCE, BUSY = 20, 4, 2
# A busy process that stops by itself, should the test's own cleanup never run.
SPIN = "import time\nend = time.monotonic() + 600\nwhile time.monotonic() < end: pass"


def _probe(env) -> subprocess.Popen:
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(PROBE)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_twenty_two_rank_finishes_under_load_all_exit_zero():
    import os

    env = {**os.environ, **THREADS, "PYTHONUNBUFFERED": "1"}
    busy = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(BUSY)]
    failures, finished = [], 0
    try:
        for _ in range(FINISHES // AT_ONCE):
            wave = [_probe(env) for _ in range(AT_ONCE)]
            for proc in wave:
                out, _ = proc.communicate(timeout=300)
                finished += 1
                if proc.returncode != 0 or "terminate called" in out:
                    failures.append(f"exit {proc.returncode}:\n{out[-3000:]}")
                else:
                    assert out.count(" done") == 2, out[-3000:]  # both ranks got to the end
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert finished == FINISHES
    assert not failures, f"{len(failures)} of {FINISHES} finishes failed; the first:\n{failures[0]}"
