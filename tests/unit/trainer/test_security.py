"""Security: nothing from a file, a config or a dataset is executed; secrets are never written.

Static checks over the project's own code (every .py under trainer/, launch/, data_pipeline/,
bench/), read with `ast` so that comments and strings do not count; the planted-secret scan of a
real run's every output file is in test_tracking.py (test_wandb_offline_run_has_config_metrics_and_samples).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from helpers import ROOT

CODE = sorted(p for d in ("trainer", "launch", "data_pipeline", "bench") for p in (ROOT / d).rglob("*.py"))


def _calls(path: Path) -> Iterator[Tuple[str, ast.Call]]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func), node


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{node.lineno}"


def _keyword(node: ast.Call, name: str):
    return next((k.value for k in node.keywords if k.arg == name), None)


def test_the_scan_sees_the_code():
    assert len(CODE) > 20 and any(p.name == "loop.py" for p in CODE)


def test_every_torch_load_is_weights_only():
    """torch.load unpickles; weights_only=True refuses anything but tensors and plain containers."""
    bad: List[str] = []
    loads = 0
    for path in CODE:
        for func, node in _calls(path):
            if func == "torch.load":
                loads += 1
                flag = _keyword(node, "weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    bad.append(_where(path, node))
    assert loads >= 3 and not bad, f"torch.load without weights_only=True at {bad}"


FORBIDDEN = {
    "eval": "evaluates a string as code",
    "exec": "executes a string as code",
    "os.system": "runs a shell command line",
    "os.popen": "runs a shell command line",
    "pickle.load": "unpickles (runs code from the file)",
    "pickle.loads": "unpickles",
    "yaml.load": "may construct arbitrary objects (use yaml.safe_load)",
    "yaml.unsafe_load": "constructs arbitrary objects",
}


def test_nothing_is_executed_or_unpickled_and_no_shell_is_used():
    bad = []
    for path in CODE:
        for func, node in _calls(path):
            if func in FORBIDDEN:
                bad.append(f"{_where(path, node)} {func}: {FORBIDDEN[func]}")
            shell = _keyword(node, "shell")
            if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
                bad.append(f"{_where(path, node)} {func}(shell=...): a command line a value could inject into")
    assert not bad, "\n".join(bad)


def test_remote_code_runs_only_when_the_config_says_so():
    """Every from_pretrained passes model.trust_remote_code (default False), never a literal True."""
    from trainer.config import ModelConfig

    assert ModelConfig(arch={"hidden_size": 8}, tokenizer_path="x").trust_remote_code is False
    bad = []
    for path in CODE:
        for func, node in _calls(path):
            flag = _keyword(node, "trust_remote_code")
            if isinstance(flag, ast.Constant) and flag.value is not False:
                bad.append(_where(path, node))
            if path.parts[-2] == "trainer" and func.endswith(".from_pretrained") and flag is None:
                bad.append(f"{_where(path, node)} (no trust_remote_code: the library default applies)")
    assert not bad, bad


@pytest.mark.parametrize(
    "key, secret",
    [
        ("api_key", True),
        ("WANDB_API_KEY", True),
        ("hf_token", True),
        ("db_password", True),
        ("client_secret_id", True),
        ("openaiApiKey", True),
        ("num_key_value_heads", False),
        ("bos_token_id", False),
        ("max_tokens", False),
        ("tokenizer_path", False),
        ("keep_last", False),
    ],
)
def test_what_counts_as_a_secret(key, secret):
    from trainer.observability.redaction import is_secret_key

    assert is_secret_key(key) is secret


def test_a_secret_in_model_arch_never_reaches_the_saved_model_config(tiny_tokenizer):
    from trainer.config import ModelConfig
    from trainer.engine.model import model_config

    cfg = ModelConfig(
        model_type="llama",
        arch={
            "hidden_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "num_key_value_heads": 2,
            "api_key": "sk-planted",
        },
        tokenizer_path="unused",
    )
    hf = model_config(cfg, tiny_tokenizer, seq_len=256, packed=False)
    assert "sk-planted" not in hf.to_json_string() and hf.hidden_size == 64 and hf.num_key_value_heads == 2


@pytest.mark.parametrize(
    "arg, shown",
    [
        ("+model.arch.api_key=sk-1", "+model.arch.api_key=<redacted>"),
        ("logger.HF_TOKEN=hf_x", "logger.HF_TOKEN=<redacted>"),
        ("db_password=x", "db_password=<redacted>"),
        ("+model.arch.num_key_value_heads=2", "+model.arch.num_key_value_heads=2"),
        ("+model.arch.bos_token_id=1", "+model.arch.bos_token_id=1"),
        ("trainer.optim.lr=1e-4", "trainer.optim.lr=1e-4"),
        ("+exp=medical", "+exp=medical"),
    ],
)
def test_the_slurm_templates_log_overrides_with_secrets_hidden(arg, shown):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # the job's Python
    out = subprocess.run(
        ["bash", "-c", 'source slurm/common.sh && _fullft_redacted "$@"', "_", arg],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == shown
