"""The vocabulary of choices: every config value that is one of a fixed set of words is a member of
one of these Enums. A leaf module (it imports nothing of the project) that trainer/ and
data_pipeline/ both import, so a choice is spelt once and compared as a member everywhere: an
unknown word fails where it enters (OmegaConf at compose time, `parse` in code), never silently
taking another branch.

Choices are `str` Enums: OmegaConf validates them ("expected one of [...]"), and a member still
compares equal to its string (`StageObjective.sft == "sft"`), so YAML, overrides and logs read as before.
"""

from __future__ import annotations

from enum import Enum
from typing import Type, TypeVar

C = TypeVar("C", bound="Choice")


class Choice(str, Enum):
    """A config choice: validated by OmegaConf, printed and compared as its plain string."""

    def __str__(self) -> str:
        return self.value


def choice(name: str, *values: str) -> type:
    """A Choice Enum whose members are named as their values (`choice("Precision", "auto", "bf16")`)."""
    return Choice(name, [(v, v) for v in values])


StageObjective = choice(
    "StageObjective", "pretrain", "sft", "instruct", "dpo"
)  # what a stage learns (the `stage=` group)
PreferenceLossName = choice("PreferenceLossName", "dpo", "ipo", "simpo")
DataFormat = choice("DataFormat", "auto", "alpaca", "sharegpt", "messages", "completion", "text")
OnError = choice("OnError", "raise", "skip")
Overlong = choice("Overlong", "auto", "truncate", "drop", "split")
Attention = choice("Attention", "sdpa", "eager", "flex_attention")
OffloadDevice = choice("OffloadDevice", "none", "cpu")
RegularizerName = choice("RegularizerName", "none", "replay", "ewc", "ewc_replay")
FisherLabels = choice("FisherLabels", "data", "sampled")
LoggerBackend = choice("LoggerBackend", "wandb", "jsonl")
WandbMode = choice("WandbMode", "online", "offline", "disabled")
LRSchedule = choice("LRSchedule", "cosine", "constant")
Precision = choice("Precision", "auto", "bf16", "fp32")
Checkpointing = choice("Checkpointing", "none", "full", "every_n", "offload")
LossKernel = choice("LossKernel", "auto", "torch", "liger")
OnNonFinite = choice("OnNonFinite", "stop", "skip")


def parse(kind: Type[C], value, where: str) -> C:
    """`value` as a member of `kind`, or a ValueError naming `where`, the value and the valid words."""
    if isinstance(value, kind):
        return value
    try:
        return kind(str(value))
    except ValueError:
        raise ValueError(f"{where}={value!r} is not one of {', '.join(m.value for m in kind)}") from None
