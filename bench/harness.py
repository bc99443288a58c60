"""Shared pieces of the performance benchmarks (throughput.py, memory.py, data_prep.py): a seeded
synthetic SFT set with a realistic length mix, the composed config and tokenizer of a model group,
a random-init starting model on disk, launching the real trainer, and the machine facts every
BENCHMARKS.md figure carries (date, commit, load).

The synthetic set is alpaca records made of sentences from the bundled data (text the tiny
tokenizer was trained on, so tokens per character are realistic), with answer lengths drawn from a
lognormal of median 250 tokens and sigma 1 (mean ~410, p99 ~2,600: the long tail of real chat/SFT
sets, as in bench/packing.py); 40% of records carry an `input` (lognormal, median 60 tokens), as in
Stanford Alpaca. Nothing is downloaded.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import random
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "data_pipeline" / "bundled"
CONF_DIR = ROOT / "conf"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainer.distributed import free_port  # noqa: E402
from trainer.observability.tracking import read_metrics, series  # noqa: E402,F401  (the one metrics reader)

# ---- the synthetic SFT set ------------------------------------------------------------------------


def _sentences():
    """Every sentence of the bundled data (notes, general text, QA answers), in file order."""
    text = []
    for name in ("medical_notes.txt", "general_text.txt"):
        text += [line for line in (BUNDLED / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    instructions = []
    for line in (BUNDLED / "medical_qa.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        text.append(rec["output"])
        instructions.append(rec["instruction"])
    sentences = [s.strip() for block in text for s in re.split(r"(?<=[.!?])\s+", block) if len(s.strip()) > 3]
    return sentences, instructions


class SentencePool:
    """Sentences with their token counts, to assemble text of about a target number of tokens."""

    def __init__(self, tokenizer) -> None:
        self.sentences, self.instructions = _sentences()
        self.tokens = [len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in self.sentences]

    def text(self, rng: random.Random, target_tokens: int) -> str:
        """Random sentences joined by spaces until they reach target_tokens (within one sentence)."""
        out, n = [], 0
        while n < target_tokens:
            i = rng.randrange(len(self.sentences))
            out.append(self.sentences[i])
            n += self.tokens[i]
        return " ".join(out)


def write_alpaca(
    path: Path,
    pool: SentencePool,
    n: int,
    seed: int,
    answer_median: float = 250.0,
    answer_sigma: float = 1.0,
    input_fraction: float = 0.4,
    input_median: float = 60.0,
    chat: bool = False,
) -> Dict:
    """n alpaca records with lognormal answer lengths (in tokens); returns a summary of the draw.
    chat=True writes each record as the conversation our pipeline makes of it (data.format=messages:
    a user turn "instruction[\\n\\ninput]" and the assistant's answer), the same draw for the same seed."""
    rng = random.Random(seed)
    answers = []
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            target = max(8, round(rng.lognormvariate(math.log(answer_median), answer_sigma)))
            answers.append(target)
            rec = {"instruction": rng.choice(pool.instructions), "input": "", "output": pool.text(rng, target)}
            if rng.random() < input_fraction:
                rec["input"] = pool.text(rng, max(4, round(rng.lognormvariate(math.log(input_median), 0.8))))
            if chat:
                user = f"{rec['instruction']}\n\n{rec['input']}" if rec["input"] else rec["instruction"]
                rec = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]}
            f.write(json.dumps(rec) + "\n")
    answers.sort()
    return {
        "records": n,
        "answer_tokens_median": answers[n // 2],
        "answer_tokens_mean": round(sum(answers) / n, 1),
        "answer_tokens_p99": answers[min(n - 1, int(0.99 * n))],
        "answer_tokens_max": answers[-1],
    }


def write_chat(path: Path, pool: SentencePool, n: int, seed: int, **kwargs) -> Dict:
    """write_alpaca's draw as {"messages": [user, assistant]} conversations (chat-format SFT data)."""
    return write_alpaca(path, pool, n, seed, chat=True, **kwargs)


# ---- config, tokenizer, starting model ------------------------------------------------------------


def compose(overrides: Sequence[str]):
    """The typed Config for these overrides, composed exactly as launch/train.py does."""
    from trainer.cli import load_config

    return load_config(list(overrides))


def tiny_tokenizer():
    """The tiny model's tokenizer (trained locally with sentencepiece and cached, as a run would)."""
    from trainer.engine.tokenizer import load_tokenizer

    return load_tokenizer(compose(["model=tiny"]).model)


def tiny_arch() -> Dict:
    """conf/model/tiny.yaml's architecture."""
    return dict(compose(["model=tiny"]).model.arch)


def save_init_model(out: Path, arch: Dict, tokenizer, seed: int, model_type: str = "llama") -> Path:
    """A random-init model + tokenizer as a Hugging Face directory: every system under comparison
    starts from exactly these weights (model.name_or_path / from_pretrained). Reused if present."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **arch,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def save_init_config(out: Path, arch: Dict, tokenizer, model_type: str = "llama") -> Path:
    """The config and tokenizer of save_init_model's directory, without weights (for dry runs)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **arch,
    )
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def arch_of(model_dir: Path) -> Dict:
    """A Hugging Face model directory's architecture as param_count takes it (plus vocab_size and
    model_type)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    keys = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
        "vocab_size",
        "model_type",
    )
    return {k: config[k] for k in keys if k in config}


def param_count(arch: Dict, vocab: int, model_type: str = "llama") -> int:
    """Parameters of a random-init model with this architecture (built on the meta device: no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=vocab, **arch)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


# ---- launching ------------------------------------------------------------------------------------


def launch_cmd(launcher: str, nproc: int, script: str = "launch/train.py") -> List[str]:
    """`script` under `deepspeed --num_gpus N` (on CPU: N CPU ranks over gloo, on a free port, so
    concurrent benchmarks do not collide) or plain `python` (one rank)."""
    if launcher == "deepspeed":
        return deepspeed_cmd(script, nproc)
    return [sys.executable, script]


def deepspeed_cmd(script: str, nproc: int) -> List[str]:
    """`deepspeed --num_gpus N script` (on CPU: N CPU ranks over gloo), on a free port."""
    return [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        str(nproc),
        "--master_port",
        str(free_port()),
        script,
    ]


def run_logged(cmd: Sequence[str], log_file: Path, env: Optional[Dict[str, str]] = None) -> float:
    """Run cmd from the repo root with its output in log_file; raise with the log's tail on failure.
    Returns the wall time (seconds)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", **(env or {})}
    log_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_file, "w") as log:
        log.write(" ".join(map(str, cmd)) + "\n")
        log.flush()
        proc = subprocess.run(list(map(str, cmd)), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "".join(log_file.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise SystemExit(f"failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n--- {log_file} (tail)\n{tail}")
    return wall


# ---- what every figure carries --------------------------------------------------------------------


def git_head() -> Optional[str]:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_line() -> str:
    """The machine in one line, for a table's caption."""
    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def load_average() -> List[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> Dict:
    import torch

    info = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    try:
        info["cpu_model"] = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    for pkg in ("transformers", "deepspeed"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001 - a version string is a nicety
            pass
    return info


def stamp() -> Dict:
    return {
        "date": datetime.date.today().isoformat(),
        "commit": git_head(),
        "load_avg_start": load_average(),
        "machine": machine(),
    }


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or b == 0 else a / b


def fmt(x, spec: str = ".3f", none: str = "–") -> str:
    return none if x is None else format(x, spec)
