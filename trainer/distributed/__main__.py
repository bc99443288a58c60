"""`python -m trainer.distributed build-ops`: build DeepSpeed's CPU ops into TORCH_EXTENSIONS_DIR
once, as `make setup` does."""

import os
import sys
import time

from trainer.distributed.ops import build_cpu_ops

if sys.argv[1:] != ["build-ops"]:
    raise SystemExit(
        "usage: python -m trainer.distributed build-ops   (builds DeepSpeed's CPU ops into "
        "TORCH_EXTENSIONS_DIR once, as `make setup` does)"
    )
started = time.time()
ready = build_cpu_ops()
print(
    f"DeepSpeed CPU ops ready in {os.environ.get('TORCH_EXTENSIONS_DIR', '(torch default)')}: "
    f"{', '.join(ready) or 'none needed'} ({time.time() - started:.0f} s)"
)
