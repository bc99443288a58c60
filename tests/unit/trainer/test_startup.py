"""What a rank does before training that costs start-up time: DeepSpeed's Muon module imported
without compiling (trainer/distributed/ops.py:import_muon_uncompiled), its CPU ops built ahead."""

from __future__ import annotations

import subprocess
import sys

from helpers import ROOT

PROBE = """
import sys, torch
from trainer.distributed.ops import MUON_MODULE, import_muon_uncompiled
compile_before = torch.compile
import_muon_uncompiled()
assert torch.compile is compile_before, "torch.compile not restored"
assert MUON_MODULE in sys.modules
from deepspeed.runtime.zero.muon import original_muon as m
fn = m.zeropower_via_newtonschulz5
assert fn.__code__.co_name == "call" and fn.__wrapped__.__name__ == "zeropower_via_newtonschulz5", fn
assert "torch._dynamo.eval_frame" not in repr(type(fn))
# what DeepSpeed asks of the module when it builds a ZeRO engine still works
from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
assert not isinstance(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]), MuonWithAuxAdam)
# (a first call would compile it then, with inductor: a minute of C++ here, so not in this test)
print("ok")
"""


def test_muon_is_imported_with_compilation_deferred_to_first_use():
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]
