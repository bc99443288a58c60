"""Typed configuration: the dataclass schemas behind every YAML file under conf/.

Each conf/ group file extends its `base_*` schema (its defaults list names it), so Hydra checks
keys and types at compose time. `launch/train.py` converts the composed config once with
`OmegaConf.to_object`; everything below it sees these dataclasses, never a DictConfig.
Cross-field checks live in `__post_init__` and say what to change.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

# A key names a secret when its last word is one of these (api_key, HF_TOKEN, db_password), or it
# contains password/secret/apikey anywhere. num_key_value_heads and bos_token_id are not secrets.
SECRET_WORDS = ("key", "token", "password", "passwd", "secret", "apikey")


@dataclass
class ModelConfig:
    name_or_path: Optional[str] = None
    """Local Hugging Face directory (config, weights, tokenizer). None = random init from `arch`."""
    model_type: str = "llama"
    """transformers model type for random init (llama, qwen2, mistral, ...); ignored with name_or_path."""
    arch: Dict[str, Any] = field(default_factory=dict)
    """HF config fields for random init (hidden_size, num_hidden_layers, ...)."""
    tokenizer_path: Optional[str] = None
    """Tokenizer directory; defaults to name_or_path."""
    tokenizer_corpus: List[str] = field(default_factory=list)
    """Text files to train a sentencepiece tokenizer on, for random-init models without tokenizer_path."""
    tokenizer_vocab_size: int = 2048
    """Vocabulary size of the locally trained sentencepiece tokenizer."""
    chat_template: Optional[str] = None
    """Jinja chat template; overrides the tokenizer's own when set."""
    trust_remote_code: bool = False
    """Run model code shipped inside name_or_path. Off unless you trust that directory."""
    attn_implementation: str = "sdpa"
    """sdpa | eager | flex_attention. sdpa and eager isolate packed documents via position_ids."""

    def __post_init__(self) -> None:
        if self.name_or_path is None and not self.arch:
            raise ValueError("model: set model.name_or_path=/local/hf/dir, or model.arch for a random-init model")
        if self.name_or_path is None and self.tokenizer_path is None and not self.tokenizer_corpus:
            raise ValueError("model: a random-init model needs model.tokenizer_path or model.tokenizer_corpus")
        allowed = ("sdpa", "eager", "flex_attention")
        if self.attn_implementation not in allowed:
            raise ValueError(f"model.attn_implementation={self.attn_implementation!r}: use one of {allowed}")


FORMATS = ("auto", "alpaca", "sharegpt", "messages", "completion", "text")


@dataclass
class SourceConfig:
    """A further training source mixed with the main one (`data.sources.<name>` in YAML)."""
    path: str = MISSING
    """File, directory or saved dataset, as data.path."""
    format: str = "auto"
    """auto | alpaca | sharegpt | messages | completion | text."""
    weight: float = 1.0
    """Share of training tokens, relative to data.weight and the other sources' weights."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"data.sources.*.format={self.format!r}: use one of {FORMATS}")
        if self.weight < 0:
            raise ValueError(f"data.sources.*.weight={self.weight}: must be >= 0")


@dataclass
class DataConfig:
    path: str = MISSING
    """Main training source: a .jsonl/.json/.txt/.md/.parquet/.csv file, a directory of them, or a
    dataset saved with `datasets.save_to_disk`."""
    name: str = "main"
    """Name of the main source in per-source metrics (train/<name>/loss)."""
    format: str = "auto"
    """auto | alpaca | sharegpt | messages | completion | text."""
    weight: float = 1.0
    """Share of training tokens of the main source, relative to the weights in `sources`."""
    sources: Dict[str, SourceConfig] = field(default_factory=dict)
    """Further sources mixed in by tokens: name -> {path, format, weight}."""
    split: str = "train"
    """Split to read from a saved DatasetDict."""
    on_error: str = "raise"
    """raise: a malformed record stops with file:line; skip: skip it and count it (in the manifest)."""
    seq_len: int = 512
    """Tokens per packed row."""
    overlong: str = "auto"
    """A sample longer than seq_len: truncate | drop | split (pretraining only); auto = split for
    pretraining, truncate otherwise. Every case is counted in the manifest."""
    packing: bool = True
    """Pack several samples per row (attention isolated per document). False: one sample per row,
    padded; costs compute, kept as a baseline and for attention kernels that cannot isolate."""
    pad_to_multiple_of: int = 8
    """Without packing: each micro-batch is padded only to its longest sample, rounded up to a
    multiple of this (8 suits tensor cores); packed rows are always seq_len wide."""
    cache_dir: Optional[str] = None
    """Where prepared data lives (on a filesystem every node sees); None = $FULLFT_CACHE/data or
    ~/.cache/fullft/data."""
    prepare_timeout_s: float = 7200.0
    """How long ranks wait for another process to finish preparing the data."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"data.format={self.format!r}: use one of {FORMATS}")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error={self.on_error!r}: use raise or skip")
        if self.overlong not in ("auto", "truncate", "drop", "split"):
            raise ValueError(f"data.overlong={self.overlong!r}: use auto, truncate, drop or split")
        if self.pad_to_multiple_of < 1:
            raise ValueError(f"data.pad_to_multiple_of={self.pad_to_multiple_of}: must be at least 1")
        if self.seq_len < 16:
            raise ValueError(f"data.seq_len={self.seq_len}: must be at least 16")
        if self.weight < 0 or self.weight + sum(s.weight for s in self.sources.values()) <= 0:
            raise ValueError("data.weight and data.sources.*.weight must be >= 0 with a positive sum")
        if self.name in self.sources:
            raise ValueError(f"data.sources.{self.name}: clashes with the main source's name (data.name)")


@dataclass
class StageConfig:
    name: str = "sft"
    """pretrain: loss on all tokens, documents concatenated; sft: loss on the final answer;
    instruct: loss on every assistant turn."""
    system_prompt: Optional[str] = None
    """System turn added to conversations that have none (sft / instruct)."""

    def __post_init__(self) -> None:
        if self.name not in ("pretrain", "sft", "instruct"):
            raise ValueError(f"stage.name={self.name!r}: use pretrain, sft or instruct (stage=<name>)")


@dataclass
class DeepSpeedConfig:
    offload_optimizer: str = "none"
    """none | cpu: keep fp32 master weights and Adam state in host memory (DeepSpeedCPUAdam)."""
    offload_param: str = "none"
    """none | cpu: keep partitioned parameters in host memory between uses."""
    overlap_comm: bool = True
    """Overlap gradient reduction with backward compute."""
    reduce_bucket_size: int = 50_000_000
    """Elements per gradient reduce-scatter bucket."""
    prefetch_bucket_size: int = 50_000_000
    """Elements of parameters fetched ahead of use (stage3_prefetch_bucket_size)."""
    param_persistence_threshold: int = 100_000
    """Parameters smaller than this many elements stay unpartitioned (stage3_param_persistence_threshold)."""
    config_file: Optional[str] = None
    """A DeepSpeed JSON whose keys are added to the generated config; a contradiction is an error."""

    def __post_init__(self) -> None:
        for key in ("offload_optimizer", "offload_param"):
            if getattr(self, key) not in ("none", "cpu"):
                raise ValueError(f"deepspeed.{key}={getattr(self, key)!r}: use none or cpu")


@dataclass
class ReplayConfig:
    path: Optional[str] = None
    """General data mixed into training (raw text for pretraining, general instructions for SFT):
    a file, directory or saved dataset, prepared like data.path."""
    format: str = "auto"
    """auto | alpaca | sharegpt | messages | completion | text."""
    ratio: float = 0.1
    """Fraction of training tokens that come from replay, in [0, 1)."""


@dataclass
class EWCConfig:
    lam: float = 1.0
    """Strength λ of the penalty λ/2·ΣF(θ−θ*)². With normalise=true, F has mean 1, so λ is in loss
    units per squared unit of average parameter drift; start with a sweep like 0.1, 1, 10, 100 and
    keep the largest λ whose domain gain you can afford (bench/forgetting.py does this sweep)."""
    fisher_data: Optional[str] = None
    """Reference data for the Fisher (what must not be forgotten): a file, directory or saved
    dataset. None = regularizer.replay.path."""
    fisher_batches: int = 8
    """Reference micro-batches per rank averaged into the Fisher."""
    normalise: bool = True
    """Scale the Fisher to mean 1 over all parameters, so λ transfers between model sizes."""
    gamma: float = 1.0
    """Online EWC decay: F ← γ·F_previous + F_new when `previous` is set."""
    previous: Optional[str] = None
    """output_dir of an earlier stage trained with EWC: its Fisher is carried into this stage."""


@dataclass
class RegularizerConfig:
    name: str = "none"
    """none | replay | ewc | ewc_replay."""
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    ewc: EWCConfig = field(default_factory=EWCConfig)

    @property
    def uses_replay(self) -> bool:
        return self.name in ("replay", "ewc_replay")

    @property
    def uses_ewc(self) -> bool:
        return self.name in ("ewc", "ewc_replay")

    def __post_init__(self) -> None:
        names = ("none", "replay", "ewc", "ewc_replay")
        if self.name not in names:
            raise ValueError(f"regularizer.name={self.name!r}: use one of {names} (regularizer=<name>)")
        if self.uses_replay:
            if not self.replay.path:
                raise ValueError(f"regularizer={self.name} needs regularizer.replay.path=<general data>")
            if not 0 <= self.replay.ratio < 1:
                raise ValueError(f"regularizer.replay.ratio={self.replay.ratio}: must be in [0, 1)")
        if self.uses_ewc:
            if not (self.ewc.fisher_data or self.replay.path):
                raise ValueError(f"regularizer={self.name} needs reference data for the Fisher: set "
                                 "regularizer.ewc.fisher_data=<general data> (or regularizer.replay.path)")
            if self.ewc.lam < 0 or self.ewc.fisher_batches < 1 or not 0 <= self.ewc.gamma <= 1:
                raise ValueError("regularizer.ewc: lam >= 0, fisher_batches >= 1 and gamma in [0, 1] are required")


@dataclass
class LoggerConfig:
    backend: str = "wandb"
    """wandb: metrics.jsonl and a W&B run (offline without an API key); jsonl: metrics.jsonl only."""
    project: str = "fullft"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team or user); None = the API key's default."""
    group: Optional[str] = None
    """W&B group; None = the experiment name."""
    name: Optional[str] = None
    """W&B run name; None = the output_dir's name."""
    tags: List[str] = field(default_factory=list)
    """W&B tags."""
    mode: Optional[str] = None
    """online | offline | disabled; None = WANDB_MODE, else online with WANDB_API_KEY, else offline."""

    def __post_init__(self) -> None:
        if self.backend not in ("wandb", "jsonl"):
            raise ValueError(f"logger.backend={self.backend!r}: use wandb or jsonl (logger=wandb|jsonl)")
        if self.mode not in (None, "online", "offline", "disabled"):
            raise ValueError(f"logger.mode={self.mode!r}: use online, offline or disabled")


@dataclass
class EvalConfig:
    sets: Dict[str, str] = field(default_factory=dict)
    """Held-out sets, name -> path (`+eval.sets.general=PATH`); each is reported as eval/<name>/loss."""
    micro_batch_size: int = 4
    """Packed rows per rank per eval forward."""
    at_start: bool = True
    """Evaluate the base model at step 0, so later evals have a reference."""
    baseline_from: Optional[str] = None
    """output_dir of an earlier stage whose step-0 general-set eval is the reference for
    eval/forgetting (set by recipes, so forgetting is measured against the original base model)."""
    sample_prompts: List[str] = field(default_factory=list)
    """Prompts generated from at each eval (greedy; chat template for sft/instruct), logged to
    output_dir/samples.jsonl and a W&B table; empty = no samples. Every rank generates (ZeRO-3)."""
    sample_max_new_tokens: int = 32
    """New tokens per sample; generation costs one collective forward per token."""


@dataclass
class TrainerConfig:
    max_steps: int = 100
    """Optimizer steps in the run."""
    micro_batch_size: int = 4
    """Packed rows per rank per forward."""
    grad_accum_steps: int = 1
    """Micro-batches per rank per optimizer step."""
    lr: float = 3.0e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine schedule floor, as a fraction of lr."""
    lr_schedule: str = "cosine"
    """cosine | constant (both after linear warmup)."""
    warmup_steps: int = 10
    """Linear warmup steps from 0 to lr."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""
    seed: int = 1234
    """Seeds model init, data order and every RNG."""
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32."""
    activation_checkpointing: str = "none"
    """none | full | every_n | offload (full, with saved layer inputs held in host memory)."""
    activation_checkpointing_every_n: int = 2
    """With every_n: checkpoint every n-th decoder layer."""
    save_every_steps: int = 50
    """Save a checkpoint every this many steps (and at the end); 0 = only at the end."""
    keep_last: int = 2
    """Complete checkpoints to keep."""
    eval_every_steps: int = 50
    """Evaluate every held-out set every this many steps (and at the end); 0 = only at the end."""
    log_every_steps: int = 10
    """Write a metrics line every this many steps."""
    dist_timeout_s: int = 600
    """Collective timeout: a rank stuck this long in a collective fails instead of hanging."""
    export_hf: bool = True
    """Write the final model to output_dir/hf in Hugging Face format (safetensors)."""
    resume_fallback: bool = False
    """When the latest checkpoint is damaged (a file missing, truncated or failing its CRC), move it
    aside and resume from the previous complete one instead of stopping."""
    on_nonfinite: str = "stop"
    """A NaN/inf loss or gradient norm: stop (naming the step and the rows) | skip (the update is
    dropped, counted in train/skipped_steps, the rows named in a warning)."""
    max_skipped_steps: int = 10
    """With on_nonfinite=skip: stop once more than this many steps of the run were skipped."""
    max_time: Optional[str] = None
    """Time budget of this process, "HH:MM:SS", "D-HH:MM:SS" or with a unit ("90m", "2h"); None = no
    limit. Before a step that would end past it, save and stop (a Slurm batch job requeues itself).
    Leave room below the walltime for one checkpoint save. See trainer/preemption.py."""

    def __post_init__(self) -> None:
        for key in ("max_steps", "micro_batch_size", "grad_accum_steps", "keep_last", "log_every_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"trainer.{key}={getattr(self, key)}: must be >= 1")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"trainer.lr_schedule={self.lr_schedule!r}: use cosine or constant")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"trainer.precision={self.precision!r}: use auto, bf16 or fp32")
        modes = ("none", "full", "every_n", "offload")
        if self.activation_checkpointing not in modes:
            raise ValueError(f"trainer.activation_checkpointing={self.activation_checkpointing!r}: use one of {modes}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"trainer.on_nonfinite={self.on_nonfinite!r}: use stop or skip")
        if self.max_skipped_steps < 0:
            raise ValueError(f"trainer.max_skipped_steps={self.max_skipped_steps}: must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"trainer.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")
        if self.max_time is not None:
            from trainer.preemption import parse_duration

            try:
                parse_duration(self.max_time)
            except ValueError as ex:
                raise ValueError(f"trainer.max_time: {ex}") from None


@dataclass
class RecipeStage:
    name: str = MISSING
    """Stage name; the stage trains into output_dir/<name>."""
    overrides: List[str] = field(default_factory=list)
    """Hydra overrides for this stage, on top of the run's own (e.g. stage=pretrain, data=medical_notes)."""
    random_init_only: bool = False
    """Run this stage only for a random-init model (e.g. general pretraining that gives the tiny demo
    model something to forget); skipped when model.name_or_path is set."""


@dataclass
class Config:
    output_dir: str = MISSING
    """One directory for all ranks; rerunning with the same output_dir resumes."""
    exp_name: str = "default"
    """Experiment name (W&B group, default output_dir)."""
    # Groups are MISSING here and filled by conf/config.yaml's defaults list, so no schema is
    # instantiated (and checked) before its YAML values are in.
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    stage: StageConfig = MISSING
    deepspeed: DeepSpeedConfig = MISSING
    regularizer: RegularizerConfig = MISSING
    logger: LoggerConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    recipe: List[RecipeStage] = field(default_factory=list)
    """Chained stages run in order by one command (see trainer/recipe.py); empty = a single run."""

    def __post_init__(self) -> None:
        if isinstance(self.data, DataConfig) and isinstance(self.stage, StageConfig):
            if self.data.overlong == "split" and self.stage.name != "pretrain":
                raise ValueError(f"data.overlong=split is for continued pretraining; stage={self.stage.name} "
                                 "needs whole samples: use data.overlong=truncate or drop")
            if not self.data.packing and self.stage.name == "pretrain":
                raise ValueError("data.packing=false applies to sft/instruct; pretraining always chunks documents")

    @property
    def overlong(self) -> str:
        """data.overlong with `auto` resolved for the stage."""
        if self.data.overlong != "auto":
            return self.data.overlong
        return "split" if self.stage.name == "pretrain" else "truncate"


GROUP_SCHEMAS = {
    "model": ModelConfig,
    "data": DataConfig,
    "stage": StageConfig,
    "deepspeed": DeepSpeedConfig,
    "regularizer": RegularizerConfig,
    "logger": LoggerConfig,
}


def samples_path(name: str) -> str:
    """`${samples:medical_qa.jsonl}`: a file of the bundled sample data, wherever the package lives."""
    return str(importlib.resources.files("data_pipeline") / "samples" / name)


def register_configs() -> None:
    """Register `base_config` and one `base_<group>` schema per group in Hydra's ConfigStore, and the
    `samples` resolver the YAML files use for bundled data."""
    OmegaConf.register_new_resolver("samples", samples_path, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"base_{group}", node=schema)


# ---- errors a person can act on ---------------------------------------------------------------

def _schema_at(path: List[str]) -> Optional[type]:
    """The dataclass at a dotted path under Config (e.g. ['trainer'] -> TrainerConfig)."""
    schema: Any = Config
    for part in path:
        schema = typing.get_type_hints(schema).get(part) if dataclasses.is_dataclass(schema) else None
    return schema if dataclasses.is_dataclass(schema) else None


def explain_key_error(full_key: str) -> str:
    """'Valid keys under trainer: ...; did you mean max_steps?' for an unknown dotted key."""
    parts = full_key.split(".")
    schema = _schema_at(parts[:-1])
    if schema is None:
        return ""
    valid = [f.name for f in dataclasses.fields(schema)]
    where = ".".join(parts[:-1]) or "the top level"
    close = difflib.get_close_matches(parts[-1], valid, n=1)
    hint = f" Did you mean '{'.'.join(parts[:-1] + close)}'?" if close else ""
    return f"Valid keys under {where}: {', '.join(valid)}.{hint}"


def check_overrides(config_dir: str, argv: List[str]) -> None:
    """Compose the config once before Hydra runs, and turn a key or type error into a message that
    names the key, the valid keys and the fix. Other problems (sweeps, --cfg, hydra/ groups) are left
    for Hydra itself to report."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    if any(a in ("-m", "--multirun", "-h", "--help", "--hydra-help", "-i", "--info") for a in argv):
        return
    overrides, skip_next = [], False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg in ("--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path", "-cp",
                     "--config-dir", "-cd"):
            skip_next = True
        elif not arg.startswith("-") and not arg.startswith("hydra.") and not arg.startswith("hydra/"):
            overrides.append(arg)
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        if not any(a in ("--cfg", "-c") for a in argv):  # Hydra creates output_dir (its run dir) next
            check_output_dir(str(cfg.output_dir))
    except PermissionError as ex:
        raise SystemExit(f"Config error: {ex}") from None
    except ConfigCompositionException as ex:
        cause = ex.__cause__
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
            full_key = getattr(cause, "full_key", "") or ""
            raise SystemExit(f"Config error: unknown key '{full_key}'. {explain_key_error(full_key)}") from None
        if isinstance(cause, ValidationError):
            raise SystemExit(f"Config error: {getattr(cause, 'msg', cause)}\n(from: {ex})") from None


def check_output_dir(output_dir: str) -> None:
    """Fail in the first second, not at the first save, when output_dir cannot be written."""
    import os

    probe = Path(output_dir) / f".write_test_{os.getpid()}"
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as ex:
        raise PermissionError(f"output_dir={output_dir!r} is not writable ({ex.strerror}: {ex.filename}); "
                              "choose another output_dir=... or fix its permissions") from None


def to_config(cfg: Any) -> Config:
    """The composed DictConfig as typed dataclasses; a failed cross-field check exits with its message."""
    try:
        config = OmegaConf.to_object(cfg)
    except Exception as ex:  # __post_init__ ValueErrors arrive wrapped by OmegaConf
        cause = ex.__cause__ or ex
        raise SystemExit(f"Config error: {cause}") from None
    assert isinstance(config, Config)
    return config


def is_secret_key(key: Any) -> bool:
    """A config key whose value must never be written anywhere (api_key, hf_token, db_password...)."""
    name = str(key).lower()
    return re.split(r"[_\-]", name)[-1] in SECRET_WORDS or any(w in name for w in ("password", "secret", "apikey"))


def redact_args(argv: List[str]) -> List[str]:
    """Command-line overrides with secret-looking values hidden (`+model.arch.api_key=X` ->
    `+model.arch.api_key=<redacted>`): W&B records the process arguments with the run, and the
    Slurm templates log them (`python -m trainer.config redact-args ...`)."""
    out = []
    for arg in argv:
        key, eq, _ = arg.partition("=")
        last = re.split(r"[./]", key.lstrip("+~"))[-1]
        out.append(f"{key}=<redacted>" if eq and is_secret_key(last) else arg)
    return out


def redact(tree: Any) -> Any:
    """A copy of a plain config tree with every secret-looking value (*_key, *_token, password) removed."""
    if isinstance(tree, dict):
        return {k: ("<redacted>" if is_secret_key(k) else redact(v))
                for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact(v) for v in tree]
    return tree


if __name__ == "__main__":  # for the Slurm templates' log: python -m trainer.config redact-args ARG...
    import sys

    if sys.argv[1:2] != ["redact-args"]:
        raise SystemExit("usage: python -m trainer.config redact-args ARG...")
    print(" ".join(redact_args(sys.argv[2:])))
