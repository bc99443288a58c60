"""The command line, before any work: turn argv into a checked Config, or into a message a person
can act on (the key, the valid keys, the fix), in the first seconds.

`launch/train.py` and `launch/prepare_data.py` call `preflight(argv)` before Hydra runs; Hydra's
own report of a bad override is a stack of internals. Renamed public keys keep working here with
a deprecation message (DEPRECATED_KEYS).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import typing
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional, Sequence

from omegaconf import OmegaConf

from trainer.config import TRAINER_MOVED, Config, register_configs

log = logging.getLogger("trainer")

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

# Old override spelling -> new, still accepted with a warning.
DEPRECATED_KEYS = {
    "stage.name": "stage.objective",
    **{f"trainer.{old}": f"trainer.{new}" for old, new in TRAINER_MOVED.items()},
}

# Hydra's own flags; those in _TAKES_VALUE consume the next argument.
_NO_PREFLIGHT = ("-m", "--multirun", "-h", "--help", "--hydra-help", "-i", "--info")
_TAKES_VALUE = ("--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd")


def upgrade_overrides(argv: Sequence[str]) -> List[str]:
    """argv with deprecated keys renamed (`stage.name=sft` -> `stage.objective=sft`), each named once
    on stderr."""
    out = []
    for arg in argv:
        prefix = arg[: len(arg) - len(arg.lstrip("+~"))]
        key, eq, value = arg[len(prefix) :].partition("=")
        if eq and key in DEPRECATED_KEYS:
            new = DEPRECATED_KEYS[key]
            log.warning("%s= is deprecated; use %s=%s", key, new, value)
            arg = f"{prefix}{new}={value}"
        out.append(arg)
    return out


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
    prefix = "".join(f"{p}." for p in parts[:-1])
    valid = [f.name for f in dataclasses.fields(schema) if prefix + f.name not in DEPRECATED_KEYS]
    where = ".".join(parts[:-1]) or "the top level"
    close = difflib.get_close_matches(parts[-1], valid, n=1)
    hint = f" Did you mean '{'.'.join(parts[:-1] + close)}'?" if close else ""
    return f"Valid keys under {where}: {', '.join(valid)}.{hint}"


def explain_validation_error(cause: Exception) -> str:
    """`trainer.precision='fp8': use one of auto, bf16, fp32` for a value outside a choice; OmegaConf's
    own message (it names the key and the value) otherwise."""
    full_key = getattr(cause, "full_key", "") or ""
    node = getattr(cause, "child_node", None)
    choice = getattr(node, "enum_type", None)  # an EnumNode: the field is one of the config's Choices
    if isinstance(choice, type) and issubclass(choice, Enum) and full_key:
        value = getattr(cause, "value", None)
        return f"{full_key}={str(value)!r}: use one of {', '.join(m.value for m in choice)}"
    return str(getattr(cause, "msg", cause))


def register() -> None:
    """What composing needs: the schemas and plain resolvers (trainer/config.py), and `imported`
    (conf/model/smollm2_135m.yaml: where a GGUF model imported by launch/import_model.py lives; it
    never raises, so every conf file composes on a machine without the model)."""
    from trainer.engine.model_import import imported_model_dir

    register_configs()
    OmegaConf.register_new_resolver("imported", imported_model_dir, replace=True)


def compose(overrides: Sequence[str], config_dir: str = CONF_DIR):
    """The composed DictConfig of conf/config.yaml with `overrides` (outside @hydra.main)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register()
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=upgrade_overrides(overrides))


def load_config(overrides: Sequence[str], config_dir: str = CONF_DIR) -> Config:
    """compose + to_config: the typed Config for these overrides (tests, benchmarks, recipes)."""
    return to_config(compose(overrides, config_dir))


def preflight(argv: List[str], config_dir: str = CONF_DIR) -> List[str]:
    """Upgrade deprecated keys, compose the config once before Hydra runs, and turn a key or type
    error into a message that names the key, the valid keys and the fix; check that output_dir can
    be written. Returns argv as Hydra should see it. Other problems (sweeps, --cfg, hydra/ groups)
    are left for Hydra itself to report."""
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    register()
    argv = upgrade_overrides(argv)
    if any(a in _NO_PREFLIGHT for a in argv):
        return argv
    overrides, skip_next = [], False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg in _TAKES_VALUE:
            skip_next = True
        elif not arg.startswith("-") and not arg.startswith("hydra.") and not arg.startswith("hydra/"):
            overrides.append(arg)
    try:
        cfg = compose(overrides, config_dir)
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
            raise SystemExit(f"Config error: {explain_validation_error(cause)}\n(from: {ex})") from None
    else:
        if str(cfg.trainer.loss_kernel) == "liger":  # asked for where it cannot run: say so now, not once ranks are up
            from trainer.objectives.head import kernel_for

            try:
                kernel_for("liger")
            except ValueError as ex:
                raise SystemExit(f"Config error: {ex}") from None
    return argv


def check_output_dir(output_dir: str) -> None:
    """Fail in the first second, not at the first save, when output_dir cannot be written."""
    probe = Path(output_dir) / f".write_test_{os.getpid()}"
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as ex:
        raise PermissionError(
            f"output_dir={output_dir!r} is not writable ({ex.strerror}: {ex.filename}); "
            "choose another output_dir=... or fix its permissions"
        ) from None


def to_config(cfg: Any) -> Config:
    """The composed DictConfig as typed dataclasses; a failed check exits with its message."""
    from omegaconf.errors import ValidationError

    try:
        config = OmegaConf.to_object(cfg)
    except ValidationError as ex:
        raise SystemExit(f"Config error: {explain_validation_error(ex)}") from None
    except Exception as ex:  # __post_init__ ValueErrors arrive wrapped by OmegaConf
        cause = ex.__cause__ or ex
        raise SystemExit(f"Config error: {cause}") from None
    assert isinstance(config, Config)
    return config
