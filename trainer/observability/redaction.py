"""Secrets never leave the process: config keys whose values must not be written anywhere.

A key names a secret when its last word is one of SECRET_WORDS (api_key, HF_TOKEN, db_password),
or it contains password/secret/apikey anywhere; num_key_value_heads and bos_token_id are not
secrets. `redact` cleans a config tree before config.yaml, W&B and the log see it; `redact_args`
cleans command-line overrides (W&B records the process arguments, the Slurm templates log them):

    python -m trainer.observability.redaction redact-args ARG...
"""

from __future__ import annotations

import re
import sys
from typing import Any, List

SECRET_WORDS = ("key", "token", "password", "passwd", "secret", "apikey")


def is_secret_key(key: Any) -> bool:
    """A config key whose value must never be written anywhere (api_key, hf_token, db_password...)."""
    name = str(key).lower()
    return re.split(r"[_\-]", name)[-1] in SECRET_WORDS or any(w in name for w in ("password", "secret", "apikey"))


def redact_args(argv: List[str]) -> List[str]:
    """Command-line overrides with secret-looking values hidden (`+model.arch.api_key=X` ->
    `+model.arch.api_key=<redacted>`)."""
    out = []
    for arg in argv:
        key, eq, _ = arg.partition("=")
        last = re.split(r"[./]", key.lstrip("+~"))[-1]
        out.append(f"{key}=<redacted>" if eq and is_secret_key(last) else arg)
    return out


def redact(tree: Any) -> Any:
    """A copy of a plain config tree with every secret-looking value (*_key, *_token, password) removed."""
    if isinstance(tree, dict):
        return {k: ("<redacted>" if is_secret_key(k) else redact(v)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact(v) for v in tree]
    return tree


if __name__ == "__main__":  # the Slurm templates' log line (slurm/common.sh)
    if sys.argv[1:2] != ["redact-args"]:
        raise SystemExit("usage: python -m trainer.observability.redaction redact-args ARG...")
    print(" ".join(redact_args(sys.argv[2:])))
