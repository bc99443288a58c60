"""Typed configuration: the dataclass schemas behind every YAML file under conf/.

Each conf/ group file extends its `base_*` schema (its defaults list names it), so Hydra checks
keys and types at compose time: a misspelt key, a wrong type or a choice outside its Enum fails
before anything runs. `launch/train.py` converts the composed config once with
`OmegaConf.to_object`; everything below it sees these dataclasses, never a DictConfig.
Cross-field checks live in `__post_init__` and say what to change.

This module only describes configuration: it imports no runtime module. The command-line
preflight (composing, key-error messages, the output_dir probe) is trainer/cli.py; secret
redaction is trainer/observability/redaction.py. The words a choice may take are Enums of
data_pipeline/choices.py, the vocabulary trainer/ and data_pipeline/ share.
"""

from __future__ import annotations

import importlib.resources
import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from data_pipeline.choices import (  # noqa: F401  (the vocabulary, re-exported for the schemas' users)
    Attention,
    Checkpointing,
    Choice,
    DataFormat,
    FisherLabels,
    LoggerBackend,
    LossKernel,
    LRSchedule,
    OffloadDevice,
    OnError,
    OnNonFinite,
    Overlong,
    Precision,
    PreferenceLossName,
    RegularizerName,
    StageObjective,
    WandbMode,
    choice,
)

# ---- durations (trainer.max_time; trainer/checkpointing/preemption.py keeps the clock) -----------------------

_DURATION = re.compile(r"^(?:(?P<d>\d+)-)?(?P<h>\d+):(?P<m>\d{1,2}):(?P<s>\d{1,2}(?:\.\d*)?)$")
_WITH_UNIT = re.compile(r"^(?P<n>\d+(?:\.\d*)?)\s*(?P<unit>s|m|h|d)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in "HH:MM:SS", "D-HH:MM:SS" (as Slurm's --time) or a number with a unit: "90s",
    "45m", "1.5h", "2d". A bare number is refused: Slurm reads it as minutes, people as seconds.

    >>> parse_duration("1-02:03:04")   # 86400 + 2*3600 + 3*60 + 4
    93784.0
    """
    text = str(text).strip()
    m = _DURATION.match(text)
    if m:
        return int(m["d"] or 0) * 86400 + int(m["h"]) * 3600 + int(m["m"]) * 60 + float(m["s"])
    m = _WITH_UNIT.match(text)
    if m:
        return float(m["n"]) * _UNIT_S[m["unit"]]
    raise ValueError(f"{text!r} is not a duration: use HH:MM:SS, D-HH:MM:SS or a number with a unit (3600s, 60m, 1h)")


# ---- schemas -----------------------------------------------------------------------------------


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
    attn_implementation: Attention = Attention.sdpa
    """sdpa | eager | flex_attention. sdpa and eager isolate packed documents via position_ids."""
    stage_overrides: Dict[str, List[str]] = field(default_factory=dict)
    """Recipe stage name -> overrides this model needs in that stage (a pretrained model's learning
    rate, the sequence length and steps that fit where it trains), applied after the stage's own
    overrides and before the command line's: `+exp=medical model=smollm2_135m` runs the medical
    recipe with the numbers conf/model/smollm2_135m.yaml gives its cpt and instruct stages."""

    def __post_init__(self) -> None:
        if self.name_or_path is None and not self.arch:
            raise ValueError("model: set model.name_or_path=/local/hf/dir, or model.arch for a random-init model")
        if self.name_or_path is None and self.tokenizer_path is None and not self.tokenizer_corpus:
            raise ValueError("model: a random-init model needs model.tokenizer_path or model.tokenizer_corpus")


@dataclass
class SourceConfig:
    """A further training source mixed with the main one (`data.sources.<name>` in YAML)."""

    path: str = MISSING
    """File, directory or saved dataset, as data.path."""
    format: DataFormat = DataFormat.auto
    """auto | alpaca | sharegpt | messages | completion | text."""
    weight: float = 1.0
    """Share of training tokens, relative to data.weight and the other sources' weights."""

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"data.sources.*.weight={self.weight}: must be >= 0")


@dataclass
class DataConfig:
    path: str = MISSING
    """Main training source: a .jsonl/.json/.txt/.md/.parquet/.csv file, a directory of them, or a
    dataset saved with `datasets.save_to_disk`."""
    name: str = "main"
    """Name of the main source in per-source metrics (train/<name>/loss)."""
    format: DataFormat = DataFormat.auto
    """auto | alpaca | sharegpt | messages | completion | text."""
    weight: float = 1.0
    """Share of training tokens of the main source, relative to the weights in `sources`."""
    sources: Dict[str, SourceConfig] = field(default_factory=dict)
    """Further sources mixed in by tokens: name -> {path, format, weight}."""
    split: str = "train"
    """Split to read from a saved DatasetDict."""
    on_error: OnError = OnError["raise"]  # `raise` is a keyword: no OnError.raise
    """raise: a malformed record stops with file:line; skip: skip it and count it (in the manifest)."""
    seq_len: int = 512
    """Tokens per packed row."""
    overlong: Overlong = Overlong.auto
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
    prepare_workers: int = 0
    """Processes that tokenize a source while it is prepared (0: every core this process may use;
    sources under 8 MiB are tokenized in the preparing process). The prepared rows are the same for
    any count."""

    def __post_init__(self) -> None:
        if self.prepare_workers < 0:
            raise ValueError(
                f"data.prepare_workers={self.prepare_workers}: must be >= 0 (0: every core this process may use)"
            )
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
    """One stage of training: a single run, or one link of a recipe's chain (`recipe:`)."""

    objective: StageObjective = StageObjective.sft
    """What the stage learns. pretrain: every token, documents concatenated; sft: the final answer;
    instruct: every assistant turn; dpo: preferences between pairs of answers (data_pipeline/preference.py)."""
    system_prompt: Optional[str] = None
    """System turn added to conversations that have none (sft / instruct / dpo)."""
    loss: PreferenceLossName = PreferenceLossName.dpo
    """dpo only: dpo (sigmoid, Rafailov et al.) | ipo (Azar et al.; log-ratios per token, as TRL) | simpo
    (Meng et al.; mean token log-probs, no reference model). Formulas: trainer/objectives/preference.py."""
    beta: float = 0.1
    """dpo only: β, the strength of the pull towards the reference (TRL's default 0.1; for ipo the
    regularisation τ; SimPO's paper uses 2.0-2.5 with simpo_gamma/β around 0.5)."""
    label_smoothing: float = 0.0
    """dpo and simpo: the assumed probability ε that a pair's preference is flipped (conservative DPO),
    in [0, 0.5); ipo defines none."""
    simpo_gamma: float = 0.5
    """simpo only: the target reward margin γ (TRL's simpo_gamma)."""

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"stage.beta={self.beta}: must be > 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"stage.label_smoothing={self.label_smoothing}: must be in [0, 0.5)")
        if self.label_smoothing and self.loss == PreferenceLossName.ipo:
            raise ValueError(
                "stage.label_smoothing is not defined for stage.loss=ipo; use stage.loss=dpo (conservative "
                "DPO) or set stage.label_smoothing=0"
            )

    @property
    def token_objective(self) -> StageObjective:
        """How this stage prepares data that is not preference pairs (eval sets, EWC's Fisher data):
        its own objective, or instruct (assistant turns; every token of raw text) in a dpo stage."""
        return StageObjective.instruct if self.objective == StageObjective.dpo else self.objective


@dataclass
class DeepSpeedConfig:
    offload_optimizer: OffloadDevice = OffloadDevice.none
    """none | cpu: keep fp32 master weights and Adam state in host memory (DeepSpeedCPUAdam)."""
    offload_param: OffloadDevice = OffloadDevice.none
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


@dataclass
class ReplayConfig:
    path: Optional[str] = None
    """General data mixed into training (raw text for pretraining, general instructions for SFT):
    a file, directory or saved dataset, prepared like data.path."""
    format: DataFormat = DataFormat.auto
    """auto | alpaca | sharegpt | messages | completion | text."""
    ratio: float = 0.1
    """Fraction of training tokens that come from replay, in [0, 1)."""
    objective: Optional[StageObjective] = None
    """What is learned from the replay data: None = the stage's objective. A chat model's continued
    pretraining (stage=pretrain) replays its chat data with `instruct` (the assistant turns only),
    e.g. the base's own answers written by launch/rehearse.py."""


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
    fisher_labels: FisherLabels = FisherLabels.data
    """The targets of the Fisher's loss. data: the reference data's own tokens (the empirical
    Fisher: the squared gradient of the reference loss). sampled: tokens drawn from the model's own
    next-token distribution at each position (the Fisher proper, one Monte Carlo sample a position,
    seeded by trainer.seed and the rank): at weights that already fit the data, the empirical
    Fisher's batch gradient is mostly noise, while the sampled one estimates the curvature of the
    model's predictions (Kunstner et al., 2019). bench/forgetting.py compares both."""
    normalise: bool = True
    """Scale the Fisher to mean 1 over all parameters, so λ transfers between model sizes."""
    gamma: float = 1.0
    """Online EWC decay: F ← γ·F_previous + F_new when `previous` is set."""
    previous: Optional[str] = None
    """output_dir of an earlier stage trained with EWC: its Fisher is carried into this stage."""


@dataclass
class InterpolationConfig:
    alphas: List[float] = field(default_factory=list)
    """At the end of the stage, score θ0 + α·(θ − θ0) on the eval sets for each α in [0, 1] (θ0: the
    stage's start, model.name_or_path; θ: the trained weights), write output_dir/interpolation.json
    and export the chosen α (trainer/forgetting/interpolation.py). Empty (and no `alpha`) = off: the export is θ."""
    beta: Optional[float] = None
    """LiNeS (Wang et al., ICLR 2025): each α < 1 of `alphas` is applied as λ(ℓ) = α + β·ℓ/(L−1) for
    block ℓ of L (the embeddings α; the final norm and an untied head α + β), so the first blocks stay
    near θ0 and the top keeps α + β of the update. α + β must stay in [0, 1]. None = the same α for
    every parameter."""
    alpha: Any = None
    """Export this α instead of choosing one: a number; one per depth group,
    `regularizer.interpolation.alpha={bottom:0.5,middle:0.75,top:1}` (a group left out keeps 1); or
    LiNeS's `{alpha:0.25,beta:0.75}` (β left out = 1 − α).
    Typed Any because OmegaConf's schemas take no union of a number and a mapping; it is checked
    before the data and the model are built (trainer/forgetting/interpolation.py: `check`), with a
    message naming this key, the value and the valid groups."""
    keep_gain: float = 0.95
    """The choice: the smallest scored α whose domain gain (eval/domain/loss below step 0's) is at least
    keep_gain × the trained model's (α = 1). Needs eval.sets.domain and the step-0 eval."""

    @property
    def enabled(self) -> bool:
        return bool(self.alphas) or self.alpha is not None


@dataclass
class DistillConfig:
    weight: float = 0.0
    """λ of the added term λ·KL_k(teacher ‖ model), averaged over the distillation tokens of the step
    across ranks (trainer/forgetting/distill.py). The teacher (`teacher`: the stage's start by
    default) has its top-k next-token distributions computed once before the first step and stored
    with the prepared data. 0 = off."""
    data: Optional[str] = None
    """The sequences distilled on (what must not be forgotten, e.g. the base's own chat answers or
    general text): a file, directory or saved dataset. None = regularizer.replay.path, prepared as
    replay prepares it."""
    objective: Optional[StageObjective] = None
    """Which tokens of `data` carry the KL: pretrain (every token) | sft/instruct (the answers). None =
    the stage's own (regularizer.replay.objective when `data` is the replay data)."""
    rows: int = 1
    """Distillation rows per rank per optimizer step: one extra micro-batch beside the stage's own,
    whose rows and tokens stay as they are (replay, by contrast, takes its share of them)."""
    top_k: int = 32
    """Teacher tokens stored per position; the rest of its mass is one residual class (the KL's
    bias is stated in trainer/objectives/distill.py). Storage: rows x seq_len x top_k x 8 bytes."""
    prompts: Optional[str] = None
    """General prompts (.txt, a prompt a line, or .jsonl as launch/rehearse.py reads them) whose answers
    by the stage's start are the distill data: generated greedily by the training engine at the
    stage's start, every rank taking its share, and cached by the start's weights and the prompts
    (trainer/forgetting/rehearsal.py). The KL is then on the answers (objective instruct unless set).
    Instead of `data`; needs a tokenizer with a chat template."""
    answer_tokens: int = 256
    """The longest answer to `prompts`; an answer cut off there is dropped and counted."""
    answer_batch_size: int = 32
    """Prompts answered together (left-padded) by one rank; under ZeRO-3 each new token is a collective
    forward whatever the batch, so larger batches take fewer of them."""
    keep_cut_off: bool = False
    """Keep answers cut off at answer_tokens (they are then distilled as cut off: for a model that never
    ends its turn, e.g. the random-init demo model)."""
    teacher: Optional[str] = None
    """None = the stage's start. A Hugging Face model directory = that model, e.g. a larger one of the
    same family (plain knowledge distillation): its top-k are computed in a pass of their own before
    the student is built, and it is freed before training. Its vocabulary must be the student's
    (token for token), or the run stops before any model is built."""

    @property
    def enabled(self) -> bool:
        return self.weight > 0

    def __post_init__(self) -> None:
        if self.weight < 0 or self.rows < 1 or self.top_k < 1:
            raise ValueError(
                f"regularizer.distill: weight >= 0, rows >= 1 and top_k >= 1 are required (weight={self.weight}, "
                f"rows={self.rows}, top_k={self.top_k})"
            )
        if self.answer_tokens < 1 or self.answer_batch_size < 1:
            raise ValueError(
                f"regularizer.distill: answer_tokens >= 1 and answer_batch_size >= 1 are required "
                f"(answer_tokens={self.answer_tokens}, answer_batch_size={self.answer_batch_size})"
            )
        if self.prompts is not None and self.data is not None:
            raise ValueError(
                f"regularizer.distill: prompts={self.prompts} and data={self.data} are both set; the distill data is "
                "either a file (data) or the start's own answers to prompts, not both: unset one"
            )
        if self.prompts is not None and self.teacher is not None:
            raise ValueError(
                f"regularizer.distill.prompts with teacher={self.teacher}: the answers to prompts are the stage's "
                "start's, generated by the training engine; for another teacher's answers write them with "
                "launch/rehearse.py --model <teacher> and pass the file as regularizer.distill.data"
            )


@dataclass
class MFTConfig:
    tau: Optional[float] = None
    """Corrective self-distillation on the stage's own tokens (MFT, trainer/forgetting/mft.py): each
    training token's target is the stage's start's next-token distribution with the correct token
    raised to probability τ where the start gives it less (the rest rescaled), instead of the one-hot
    label. τ = 1 is plain fine-tuning; lower keeps the start's distribution wherever it already
    ranks the data's token highly enough. None = off."""
    top_k: int = 32
    """The start's tokens stored per training position (the correct token always among them); the
    rest of its mass is one residual class. Storage: training rows x seq_len x top_k x 8 bytes."""

    @property
    def enabled(self) -> bool:
        return self.tau is not None

    def __post_init__(self) -> None:
        if self.tau is not None and not 0 < self.tau <= 1:
            raise ValueError(
                f"regularizer.mft.tau={self.tau}: the correct token's least target probability, in (0, 1] "
                "(1 = plain fine-tuning; e.g. 0.5), or null (off)"
            )
        if self.top_k < 2:
            raise ValueError(
                f"regularizer.mft.top_k={self.top_k}: must be >= 2 (the correct token and the start's best)"
            )


@dataclass
class FreezeConfig:
    first_blocks: int = 0
    """Freeze transformer blocks 0..first_blocks-1 for the stage (trainer/forgetting/freezing.py): they
    keep the stage's start, get no gradient and hold no optimizer state (16 bytes a parameter less
    under ZeRO-3, over the ranks). In an untied model the token embeddings below them are frozen too. 0 = off."""
    embeddings: Optional[bool] = None
    """Freeze the token embeddings: None = with first_blocks > 0, when the LM head is untied (in a tied
    model the embedding is also the LM head, so it stays trainable); true/false = as said."""

    def __post_init__(self) -> None:
        if self.first_blocks < 0:
            raise ValueError(f"regularizer.freeze.first_blocks={self.first_blocks}: must be >= 0 (0 = off)")

    @property
    def enabled(self) -> bool:
        return self.first_blocks > 0 or bool(self.embeddings)


@dataclass
class RegularizerConfig:
    name: RegularizerName = RegularizerName.none
    """none | replay | ewc | ewc_replay (the `regularizer=` group)."""
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    """Replay: general data mixed into every step by tokens (used by replay and ewc_replay)."""
    ewc: EWCConfig = field(default_factory=EWCConfig)
    """Elastic weight consolidation: a Fisher-weighted pull towards the stage's start (ewc, ewc_replay)."""
    interpolation: InterpolationConfig = field(default_factory=InterpolationConfig)
    """Weight interpolation with the stage's start after training (with any of the above)."""
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    """The first blocks kept at the stage's start for the whole stage (with any of the above)."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """A KL term toward the stage's start on chosen sequences, beside the stage's loss (with any of the above)."""
    mft: MFTConfig = field(default_factory=MFTConfig)
    """Corrective targets on the stage's own tokens: the start's distribution, the correct token raised to τ."""

    @property
    def uses_replay(self) -> bool:
        return self.name in (RegularizerName.replay, RegularizerName.ewc_replay)

    @property
    def uses_ewc(self) -> bool:
        return self.name in (RegularizerName.ewc, RegularizerName.ewc_replay)

    def __post_init__(self) -> None:
        if self.uses_replay:
            if not self.replay.path:
                raise ValueError(f"regularizer={self.name} needs regularizer.replay.path=<general data>")
            if not 0 <= self.replay.ratio < 1:
                raise ValueError(f"regularizer.replay.ratio={self.replay.ratio}: must be in [0, 1)")
        if self.uses_ewc:
            if not (self.ewc.fisher_data or self.replay.path):
                raise ValueError(
                    f"regularizer={self.name} needs reference data for the Fisher: set "
                    "regularizer.ewc.fisher_data=<general data> (or regularizer.replay.path)"
                )
            if self.ewc.lam < 0 or self.ewc.fisher_batches < 1 or not 0 <= self.ewc.gamma <= 1:
                raise ValueError("regularizer.ewc: lam >= 0, fisher_batches >= 1 and gamma in [0, 1] are required")
        if self.distill.enabled and not (self.distill.data or self.distill.prompts or self.replay.path):
            raise ValueError(
                f"regularizer.distill.weight={self.distill.weight} needs sequences to distill on: set "
                "regularizer.distill.data=<general data or the base's own answers>, regularizer.distill.prompts="
                "<general prompts> (the start answers them) or regularizer.replay.path"
            )
        i = self.interpolation
        bad = [a for a in i.alphas if not 0 <= a <= 1]
        if bad:
            raise ValueError(
                f"regularizer.interpolation.alphas={list(i.alphas)}: {bad} outside [0, 1] "
                "(0 = the stage's start, 1 = the trained weights)"
            )
        if i.beta is not None:
            if not i.alphas:
                raise ValueError(
                    f"regularizer.interpolation.beta={i.beta} shapes the swept alphas, and none are set: add "
                    "regularizer.interpolation.alphas=[...], or export a fixed LiNeS scaling with "
                    "regularizer.interpolation.alpha={alpha:0.25,beta:0.75}"
                )
            bad = [a for a in i.alphas if a < 1 and not 0 <= a + i.beta <= 1]
            if bad:
                raise ValueError(
                    f"regularizer.interpolation.beta={i.beta}: with alphas {bad} the top block's λ = α + β leaves "
                    "[0, 1]; lower beta or those alphas"
                )
        if not 0 < i.keep_gain <= 1:
            raise ValueError(f"regularizer.interpolation.keep_gain={i.keep_gain}: must be in (0, 1]")


@dataclass
class LoggerConfig:
    backend: LoggerBackend = LoggerBackend.wandb
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
    mode: Optional[WandbMode] = None
    """online | offline | disabled; None = WANDB_MODE, else online with WANDB_API_KEY, else offline."""
    dashboard: bool = True
    """Draw output_dir/dashboard.png from metrics.jsonl at the end of a run (rank 0, ~3 s of
    matplotlib; `python launch/plot.py OUTPUT_DIR` draws it at any time)."""


@dataclass
class HarnessConfig:
    tasks: List[str] = field(default_factory=list)
    """lm-eval-harness tasks run on plain prompts (trainer/harness.py), logged as
    eval/harness/<task>/<metric>: the bundled ones (trainer/harness_tasks/: fullft_general, fullft_computing,
    fullft_medical), lm-eval's own by name, or a user's from include_path. Empty = off."""
    chat_tasks: List[str] = field(default_factory=list)
    """Tasks run through the tokenizer's chat template (lm_eval --apply_chat_template), e.g. the bundled
    instruction-following probe fullft_ifeval."""
    include_path: List[str] = field(default_factory=list)
    """Directories of the user's own lm-eval task YAML files (lm_eval --include_path); trainer/harness_tasks/
    is always on it."""
    every_steps: int = 0
    """Also run the tasks every N steps; 0 = only at the stage's start and end."""
    at_start: Optional[bool] = None
    """Run the tasks at step 0; None = as eval.at_start. A recipe's later stages set false: their start
    is the previous stage's end, already scored."""
    limit: Optional[int] = None
    """At most this many items per task (lm_eval --limit); None = all."""
    num_fewshot: Optional[int] = None
    """Few-shot examples per item (lm_eval --num_fewshot); None = each task's own setting."""
    max_length: int = 2048
    """Tokens per scoring row: loglikelihood requests are packed into rows this long, a longer request
    is cut from the left (counted in the log), and prompt plus generation must fit in it."""
    gen_batch_size: int = 16
    """Prompts per rank per generate call (generate_until tasks)."""
    gen_kwargs: Optional[str] = None
    """Generation settings over every generation task's own (lm_eval --gen_kwargs), quoted on the
    command line: eval.harness.gen_kwargs='max_gen_toks=64,temperature=0'."""
    bootstrap_iters: int = 1000
    """lm-eval's bootstrap resamples for the standard errors of non-mean metrics (0 = none)."""
    seed: int = 1234
    """lm-eval's seeds (few-shot sampling, sampled generation): fixed, so evaluations compare."""

    @property
    def enabled(self) -> bool:
        return bool(self.tasks or self.chat_tasks)

    def __post_init__(self) -> None:
        both = sorted(set(self.tasks) & set(self.chat_tasks))
        if both:
            raise ValueError(
                f"eval.harness: {both} listed in both tasks and chat_tasks; their metrics share one name "
                "(eval/harness/<task>/<metric>): list each task once (copy its YAML under another task name "
                "into eval.harness.include_path to run it both ways)"
            )
        if (
            self.every_steps < 0
            or self.max_length < 2
            or self.gen_batch_size < 1
            or (self.limit is not None and self.limit < 1)
        ):
            raise ValueError(
                f"eval.harness: every_steps >= 0, max_length >= 2, gen_batch_size >= 1 and limit >= 1 (or null) "
                f"are required (every_steps={self.every_steps}, max_length={self.max_length}, "
                f"gen_batch_size={self.gen_batch_size}, limit={self.limit})"
            )


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
    harness: HarnessConfig = field(default_factory=HarnessConfig)
    """Task-level evaluation with lm-eval-harness (trainer/harness.py)."""


@dataclass
class OptimConfig:
    lr: float = 3.0e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    adam_beta1: float = 0.9
    """AdamW β1: decay of the first-moment (momentum) average."""
    adam_beta2: float = 0.95
    """AdamW β2: decay of the second-moment average (0.95 is steadier than 0.999 for LLMs)."""
    adam_eps: float = 1.0e-8
    """AdamW ε added to the root of the second moment."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""


@dataclass
class ScheduleConfig:
    decay: LRSchedule = LRSchedule.cosine
    """cosine | constant, after the linear warmup."""
    warmup_steps: int = 10
    """Linear warmup steps from 0 to trainer.optim.lr."""
    min_lr_ratio: float = 0.1
    """Cosine schedule floor, as a fraction of trainer.optim.lr."""

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"trainer.schedule.warmup_steps={self.warmup_steps}: must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"trainer.schedule.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")


@dataclass
class CadenceConfig:
    save_every_steps: int = 50
    """Save a checkpoint every this many steps (and at the end); 0 = only at the end."""
    keep_last: int = 2
    """Complete checkpoints to keep."""
    eval_every_steps: int = 50
    """Evaluate every held-out set every this many steps (and at the end); 0 = only at the end."""
    log_every_steps: int = 10
    """Write a metrics line every this many steps; each line summarises the steps since the last
    (token-weighted losses and fractions, summed counts, peak memory's max, the last lr)."""

    def __post_init__(self) -> None:
        for key in ("keep_last", "log_every_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"trainer.cadence.{key}={getattr(self, key)}: must be >= 1")
        for key in ("save_every_steps", "eval_every_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"trainer.cadence.{key}={getattr(self, key)}: must be >= 0 (0 = only at the end)")


@dataclass
class ResumeConfig:
    elastic: bool = True
    """Resume a checkpoint saved by another number of ranks: convert it once to DeepSpeed's universal
    format and reshard weights, Adam's moments and EWC's state, keeping the global batch
    (trainer/checkpointing/reshard.py). false = stop, saying how to go on."""
    allow_new_global_batch: bool = False
    """On a resume whose settings cannot keep the checkpoint's global batch, go on with the new one
    (the data continues from the row where the checkpoint stopped) instead of stopping."""
    fallback: bool = False
    """When the latest checkpoint is damaged (a file missing, truncated or failing its CRC), move it
    aside and resume from the previous complete one instead of stopping."""


@dataclass
class FailureConfig:
    on_nonfinite: OnNonFinite = OnNonFinite.stop
    """A NaN/inf loss or gradient norm: stop (naming the step and the rows) | skip (the update is
    dropped, counted in train/skipped_steps, the rows named in a warning)."""
    max_skipped_steps: int = 10
    """With on_nonfinite=skip: stop once more than this many steps of the run were skipped."""
    dist_timeout_s: int = 600
    """Collective timeout: a rank stuck this long in a collective fails instead of hanging."""

    def __post_init__(self) -> None:
        if self.max_skipped_steps < 0:
            raise ValueError(f"trainer.failure.max_skipped_steps={self.max_skipped_steps}: must be >= 0")
        if self.dist_timeout_s < 1:
            raise ValueError(f"trainer.failure.dist_timeout_s={self.dist_timeout_s}: must be >= 1")


# trainer.<old key> -> trainer.<new key>: the flat names of before the grouping. Both the command line
# (trainer/cli.py rewrites the override) and YAML files (the alias fields below, moved in
# __post_init__) keep working, each with a deprecation message naming the new key.
TRAINER_MOVED: Dict[str, str] = {
    **{k: f"optim.{k}" for k in ("lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "grad_clip")},
    "lr_schedule": "schedule.decay",
    "warmup_steps": "schedule.warmup_steps",
    "min_lr_ratio": "schedule.min_lr_ratio",
    **{k: f"cadence.{k}" for k in ("save_every_steps", "keep_last", "eval_every_steps", "log_every_steps")},
    "elastic_resume": "resume.elastic",
    "allow_new_global_batch": "resume.allow_new_global_batch",
    "resume_fallback": "resume.fallback",
    **{k: f"failure.{k}" for k in ("on_nonfinite", "max_skipped_steps", "dist_timeout_s")},
}


@dataclass
class TrainerConfig:
    max_steps: int = 100
    """Optimizer steps in the run."""
    max_time: Optional[str] = None
    """Time budget of this process, "HH:MM:SS", "D-HH:MM:SS" or with a unit ("90m", "2h"); None = no
    limit. Before a step that would end past it, save and stop (a Slurm batch job requeues itself).
    Leave room below the walltime for one checkpoint save. See trainer/checkpointing/preemption.py."""
    micro_batch_size: int = 4
    """Packed rows per rank per forward."""
    grad_accum_steps: Optional[int] = None
    """Micro-batches per rank per optimizer step. None = derived: from global_batch_size when that is
    set; on a resume, whatever keeps the checkpoint's global batch on this world size; else 1."""
    global_batch_size: Optional[int] = None
    """Rows per optimizer step over all ranks (micro_batch_size x grad_accum_steps x world size); when
    set, grad_accum_steps is derived from it on any number of ranks. None = from grad_accum_steps."""
    seed: int = 1234
    """Seeds model init, data order and every RNG."""
    precision: Precision = Precision.auto
    """auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32."""
    activation_checkpointing: Checkpointing = Checkpointing.none
    """none | full | every_n | offload (full, with saved layer inputs held in host memory)."""
    activation_checkpointing_every_n: int = 2
    """With every_n: checkpoint every n-th decoder layer."""
    loss_chunk_tokens: Optional[int] = None
    """Chunked cross-entropy (trainer/objectives/chunked.py): the LM head and the loss computed this many
    tokens at a time and recomputed in backward, so the [tokens x vocab] logits never exist. None =
    on where the vocabulary is at least 4x the hidden size (every real LM), chunks of at most 256 MiB
    of fp32 logits; 0 = off (full logits)."""
    loss_kernel: LossKernel = LossKernel.auto
    """What computes the chunked cross-entropy's chunks: auto (Liger's fused linear cross-entropy on a
    CUDA GPU when liger-kernel is installed, the `liger` extra; torch otherwise) | torch | liger (stops
    at start if it cannot run here)."""
    export_hf: bool = True
    """Write the final model to output_dir/hf in Hugging Face format (safetensors)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW: peak lr, weight decay, betas, ε, gradient clipping."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """The learning-rate schedule: linear warmup, then cosine decay to a floor, or constant."""
    cadence: CadenceConfig = field(default_factory=CadenceConfig)
    """How often the loop saves, evaluates and logs, and how many checkpoints it keeps."""
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    """Resuming on another number of ranks, with another batch, or past a damaged checkpoint."""
    failure: FailureConfig = field(default_factory=FailureConfig)
    """Non-finite losses and gradients, hung collectives."""

    # Deprecated flat names (TRAINER_MOVED): null unless an old YAML file or script sets them;
    # __post_init__ moves a set one to its group and leaves it null.
    lr: Optional[float] = None
    """Deprecated: trainer.optim.lr."""
    weight_decay: Optional[float] = None
    """Deprecated: trainer.optim.weight_decay."""
    adam_beta1: Optional[float] = None
    """Deprecated: trainer.optim.adam_beta1."""
    adam_beta2: Optional[float] = None
    """Deprecated: trainer.optim.adam_beta2."""
    adam_eps: Optional[float] = None
    """Deprecated: trainer.optim.adam_eps."""
    grad_clip: Optional[float] = None
    """Deprecated: trainer.optim.grad_clip."""
    lr_schedule: Optional[LRSchedule] = None
    """Deprecated: trainer.schedule.decay."""
    warmup_steps: Optional[int] = None
    """Deprecated: trainer.schedule.warmup_steps."""
    min_lr_ratio: Optional[float] = None
    """Deprecated: trainer.schedule.min_lr_ratio."""
    save_every_steps: Optional[int] = None
    """Deprecated: trainer.cadence.save_every_steps."""
    keep_last: Optional[int] = None
    """Deprecated: trainer.cadence.keep_last."""
    eval_every_steps: Optional[int] = None
    """Deprecated: trainer.cadence.eval_every_steps."""
    log_every_steps: Optional[int] = None
    """Deprecated: trainer.cadence.log_every_steps."""
    elastic_resume: Optional[bool] = None
    """Deprecated: trainer.resume.elastic."""
    allow_new_global_batch: Optional[bool] = None
    """Deprecated: trainer.resume.allow_new_global_batch."""
    resume_fallback: Optional[bool] = None
    """Deprecated: trainer.resume.fallback."""
    on_nonfinite: Optional[OnNonFinite] = None
    """Deprecated: trainer.failure.on_nonfinite."""
    max_skipped_steps: Optional[int] = None
    """Deprecated: trainer.failure.max_skipped_steps."""
    dist_timeout_s: Optional[int] = None
    """Deprecated: trainer.failure.dist_timeout_s."""

    def __post_init__(self) -> None:
        moved = set()
        for old, new in TRAINER_MOVED.items():
            value = getattr(self, old)
            if value is None:
                continue
            group, key = new.split(".")
            message = f"trainer.{old} is deprecated: use trainer.{new} (its value {value} is moved there)"
            warnings.warn(message, FutureWarning, stacklevel=2)
            setattr(getattr(self, group), key, value)
            setattr(self, old, None)
            moved.add(group)
        for group in sorted(moved):  # check the moved values as if they had been set in the group
            check = getattr(getattr(self, group), "__post_init__", None)
            if check is not None:
                check()
        for key in ("max_steps", "micro_batch_size", "activation_checkpointing_every_n"):
            if getattr(self, key) < 1:
                raise ValueError(f"trainer.{key}={getattr(self, key)}: must be >= 1")
        for key in ("grad_accum_steps", "global_batch_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"trainer.{key}={getattr(self, key)}: must be >= 1, or null (derived)")
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens < 0:
            raise ValueError(
                f"trainer.loss_chunk_tokens={self.loss_chunk_tokens}: 0 (off), a chunk size, or null (auto)"
            )
        if self.max_time is not None:
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
    """The model and its tokenizer (`model=` group)."""
    data: DataConfig = MISSING
    """Training data: sources, format, packing (`data=` group)."""
    stage: StageConfig = MISSING
    """What this stage learns (`stage=` group: pretrain | sft | instruct | dpo)."""
    deepspeed: DeepSpeedConfig = MISSING
    """ZeRO-3 settings (`deepspeed=` group: zero3 | zero3_offload)."""
    regularizer: RegularizerConfig = MISSING
    """Forgetting control (`regularizer=` group: none | replay | ewc | ewc_replay)."""
    logger: LoggerConfig = MISSING
    """Where metrics go (`logger=` group: wandb | jsonl)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out sets, forgetting reference and generated samples."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Steps, batch, optimizer, schedule, checkpoints and the loop's cadences."""
    recipe: List[RecipeStage] = field(default_factory=list)
    """Chained stages run in order by one command (see trainer/recipe.py); empty = a single run."""

    def __post_init__(self) -> None:
        if isinstance(self.data, DataConfig) and isinstance(self.stage, StageConfig):
            if self.data.overlong == Overlong.split and self.stage.objective != StageObjective.pretrain:
                raise ValueError(
                    f"data.overlong=split is for continued pretraining; stage={self.stage.objective} "
                    "needs whole samples: use data.overlong=truncate or drop"
                )
            replay = self.regularizer.replay.objective if isinstance(self.regularizer, RegularizerConfig) else None
            if self.data.overlong == Overlong.split and replay not in (None, StageObjective.pretrain):
                raise ValueError(
                    f"data.overlong=split is for continued pretraining; regularizer.replay.objective={replay} "
                    "needs whole samples: use data.overlong=truncate or drop (or auto)"
                )
            if (
                self.stage.objective == StageObjective.dpo
                and isinstance(self.regularizer, RegularizerConfig)
                and self.regularizer.uses_replay
            ):
                raise ValueError(
                    f"regularizer={self.regularizer.name} with stage=dpo: replay is refused in a preference "
                    "stage (its rows would need a token loss beside the pair loss, two normalisations in "
                    "one step). Use regularizer=ewc with regularizer.ewc.fisher_data=<general data>, or "
                    "regularizer=none; the stage's β already keeps it near its start."
                )
            if self.stage.objective == StageObjective.dpo and self.regularizer.distill.enabled:
                raise ValueError(
                    "regularizer.distill with stage=dpo: a preference stage's loss is a mean over pairs and the "
                    "KL term a mean over tokens; distill in the stages before it, or keep the policy near its "
                    "start with the stage's β (and regularizer=ewc)"
                )
            if self.stage.objective == StageObjective.dpo and self.regularizer.mft.enabled:
                raise ValueError(
                    f"regularizer.mft.tau={self.regularizer.mft.tau} with stage=dpo: corrective targets replace "
                    "a token loss's one-hot labels, and a preference stage has none; use it in the "
                    "pretrain/sft/instruct stages (regularizer.mft.tau=null here)"
                )
            if not self.data.packing and self.stage.objective == StageObjective.pretrain:
                raise ValueError("data.packing=false applies to sft/instruct; pretraining always chunks documents")

    @property
    def overlong(self) -> Overlong:
        """data.overlong with `auto` resolved for the stage."""
        return self.overlong_for(self.stage.objective)

    def overlong_for(self, objective: StageObjective) -> Overlong:
        """data.overlong with `auto` resolved for a source learned with `objective` (a replay source
        may have its own: regularizer.replay.objective)."""
        if self.data.overlong != Overlong.auto:
            return self.data.overlong
        return Overlong.split if objective == StageObjective.pretrain else Overlong.truncate


def config_tree(cfg: Config) -> Dict[str, Any]:
    """The config as plain dicts and values (output_dir/config.yaml, W&B's config, the config hash),
    without the deprecated flat trainer names: always null once __post_init__ has moved them."""
    tree = asdict(cfg)
    for old in TRAINER_MOVED:
        tree["trainer"].pop(old, None)
    return tree


GROUP_SCHEMAS = {
    "model": ModelConfig,
    "data": DataConfig,
    "stage": StageConfig,
    "deepspeed": DeepSpeedConfig,
    "regularizer": RegularizerConfig,
    "logger": LoggerConfig,
}


def bundled_path(name: str) -> str:
    """`${bundled:medical_qa.jsonl}`: a file of the bundled sample data, wherever the package lives."""
    return str(importlib.resources.files("data_pipeline") / "bundled" / name)


def _deprecated_samples(name: str) -> str:
    global _WARNED_SAMPLES
    if not _WARNED_SAMPLES:
        _WARNED_SAMPLES = True
        warnings.warn(
            "${samples:...} is deprecated: the bundled data is ${bundled:...} (data_pipeline/bundled/)",
            DeprecationWarning,
            stacklevel=2,
        )
    return bundled_path(name)


_WARNED_SAMPLES = False


def register_configs() -> None:
    """Register `base_config` and one `base_<group>` schema per group in Hydra's ConfigStore, and the
    resolvers that need nothing at run time: `bundled` (data shipped in data_pipeline/bundled/);
    `samples`, its old name, still resolves and says so once. trainer/cli.py's `register` adds the
    rest (`imported`)."""
    OmegaConf.register_new_resolver("bundled", bundled_path, replace=True)
    OmegaConf.register_new_resolver("samples", _deprecated_samples, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"base_{group}", node=schema)
