"""Weight interpolation with a stage's start: θ(α) = θ0 + α·(θ − θ0).

α = 1 is the fine-tuned model, α = 0 the model the stage started from; in between, the domain gain
and the forgetting both shrink, and for many fine-tunes the forgetting shrinks much faster (Lin et
al., "Mitigating the Alignment Tax of RLHF", EMNLP 2024: plain interpolation gave the best
forgetting Pareto front of the methods they compared). No extra training: a sweep of α costs one
evaluation per α.

α may differ by depth, in two ways:
- by group (their heterogeneous model averaging): every parameter belongs to one of three groups,
  `bottom` (token embeddings and the first third of the transformer blocks), `middle` and `top` (the
  last third, the final norm and an untied LM head); a tied LM head is the embedding and follows
  `bottom`. Written `bottom=0.25,middle=0.5,top=1` (a group left out takes 1, i.e. keeps its
  fine-tuned weights).
- linearly (LiNeS, Wang et al., ICLR 2025): block ℓ of L takes λ(ℓ) = α + β·ℓ/(L−1), so shallow
  blocks, which hold general features, stay near θ0 and the top takes α + β of the update; the
  embeddings (and a tied head) take α, the final norm and an untied head α + β. Written
  `alpha=0.25,beta=0.75`; β left out is 1 − α (the top keeps the whole update).
A plain `0.5` is every parameter's α.

In a run (`regularizer.interpolation`, see `sweep`): after the last step, each α is applied to the
ZeRO-3 engine and the eval sets are scored; the chosen α is what the stage exports. Offline: bench/
forgetting.py sweeps α on exported models, and `python -m trainer.forgetting.interpolation START END OUT
--alpha A` writes an interpolated Hugging Face directory from a stage's start and its export.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Union

import torch

from trainer.components import Component

log = logging.getLogger("trainer")

GROUPS = ("bottom", "middle", "top")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_TOP = ("norm.weight", "lm_head.weight")  # after the last block


@dataclass(frozen=True)
class Lines:
    """LiNeS's depth-linear scaling: λ(ℓ) = alpha + beta·ℓ/(L−1) for block ℓ of L."""

    alpha: float
    beta: float

    def at(self, depth: float) -> float:
        """λ at a relative depth in [0, 1] (0: the first block and the embeddings, 1: the top)."""
        return self.alpha + self.beta * depth


Alpha = Union[float, Dict[str, float], Lines]
LINES_KEYS = ("alpha", "beta")


def lines(alpha: float, beta: Optional[float] = None, where: str = "interpolation") -> Lines:
    """LiNeS's (α, β), β = 1 − α when not given; λ must stay in [0, 1] at both ends."""
    beta = 1.0 - alpha if beta is None else beta
    if not (0 <= alpha <= 1 and 0 <= alpha + beta <= 1):
        raise ValueError(
            f"{where}: alpha={alpha:g}, beta={beta:g} gives λ from {alpha:g} (first block) to {alpha + beta:g} "
            "(top); both must be in [0, 1] (0 = the stage's start, 1 = the trained weights)"
        )
    return Lines(float(alpha), float(beta))


def parse_alpha(spec: Union[str, float, Mapping[str, float]]) -> Alpha:
    """`0.5` -> 0.5; `bottom=0.25,top=1` -> {bottom: 0.25, middle: 1.0, top: 1.0};
    `alpha=0.25,beta=0.5` -> Lines(0.25, 0.5). A bad spec raises ValueError naming the part that is
    wrong."""
    if isinstance(spec, (int, float)):
        return float(spec)
    if isinstance(spec, Mapping):
        items = dict(spec)
    else:
        text = str(spec).strip()
        if "=" not in text:
            try:
                return float(text)
            except ValueError:
                raise ValueError(
                    f"interpolation alpha {spec!r}: expected a number (0.5), group=number pairs "
                    f"(bottom=0.25,middle=0.5,top=1) with groups {', '.join(GROUPS)}, or LiNeS's "
                    "alpha=0.25,beta=0.75"
                ) from None
        items = {}
        for part in text.split(","):
            key, _, value = part.partition("=")
            try:
                items[key.strip()] = float(value)
            except ValueError:
                raise ValueError(f"interpolation alpha {spec!r}: {part!r} is not group=number") from None
    if items and set(items) <= set(LINES_KEYS) and "alpha" in items:
        return lines(items["alpha"], items.get("beta"), where=f"interpolation alpha {spec!r}")
    unknown = sorted(set(items) - set(GROUPS))
    if unknown:
        raise ValueError(
            f"interpolation alpha {spec!r}: unknown group(s) {unknown}; the groups are {', '.join(GROUPS)} "
            "(or LiNeS's alpha=A,beta=B)"
        )
    return {g: float(items.get(g, 1.0)) for g in GROUPS}


def alpha_label(alpha: Alpha) -> str:
    """The spec parse_alpha reads back: `0.5` or `bottom=0.25,middle=0.5,top=1`."""
    if isinstance(alpha, dict):
        return ",".join(f"{g}={alpha[g]:g}" for g in GROUPS)
    if isinstance(alpha, Lines):
        return f"alpha={alpha.alpha:g},beta={alpha.beta:g}"
    return f"{alpha:g}"


def block_of(name: str) -> Optional[int]:
    """The transformer block index of parameter `name` (`model.layers.7.mlp...` -> 7); None outside
    the blocks (embeddings, final norm, LM head)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def _is_top(name: str) -> bool:
    return any(name == t or name.endswith("." + t) for t in _TOP)


def group_of(name: str, num_layers: int) -> str:
    """The depth group of parameter `name` in a model of `num_layers` transformer blocks (HF names:
    `model.layers.7.mlp...`, `model.embed_tokens.weight`, `model.norm.weight`, `lm_head.weight`)."""
    block = block_of(name)
    if block is not None:
        return GROUPS[min(3 * block // max(num_layers, 1), 2)]
    if _is_top(name):
        return "top"
    return "bottom"  # embeddings and anything before the first block


def depth_of(name: str, num_layers: int) -> float:
    """Relative depth in [0, 1] of parameter `name`: block ℓ of L is ℓ/(L−1); the embeddings (and a
    tied head, which is the embedding) 0; the final norm and an untied head 1."""
    block = block_of(name)
    if block is not None:
        return block / max(num_layers - 1, 1)
    return 1.0 if _is_top(name) else 0.0


def alpha_of(alpha: Alpha, name: str, num_layers: int) -> float:
    if isinstance(alpha, Lines):
        return alpha.at(depth_of(name, num_layers))
    return alpha[group_of(name, num_layers)] if isinstance(alpha, dict) else alpha


def rule(alpha: Alpha) -> Dict:
    """What interpolation.json says was applied."""
    if isinstance(alpha, Lines):
        return {"rule": "theta0 + lambda(l) * (theta - theta0), lambda(l) = alpha + beta * l / (L - 1)"}
    return {"rule": "theta0 + alpha * (theta - theta0)", "groups": GROUPS if isinstance(alpha, dict) else None}


def interpolate(
    start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor], alpha: Alpha, num_layers: int
) -> Dict[str, torch.Tensor]:
    """θ0 + α(θ − θ0) for every tensor of `end`, α by the tensor's group; computed in fp32 and cast
    back to `end`'s dtype. Both state dicts must hold the same names and shapes."""
    missing = sorted(set(end) - set(start))
    if missing:
        raise KeyError(
            f"interpolation: the start has no {missing[:5]}{' ...' if len(missing) > 5 else ''}: "
            "start and fine-tuned model must be the same architecture"
        )
    out = {}
    for name, theta in end.items():
        theta0 = start[name]
        if theta0.shape != theta.shape:
            raise ValueError(
                f"interpolation: {name} is {tuple(theta0.shape)} at the start and {tuple(theta.shape)} "
                "after fine-tuning (a resized vocabulary?); interpolate models of the same shapes"
            )
        a = alpha_of(alpha, name, num_layers)
        out[name] = torch.lerp(theta0.float(), theta.float(), a).to(theta.dtype)
    return out


def _load_weights(directory: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors files (a Hugging Face model directory is expected)")
    weights: Dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    return weights


def write_interpolated(start_dir: str, end_dir: str, alpha: Alpha, out_dir: str) -> Path:
    """A Hugging Face directory with θ0 + α(θ − θ0): `end_dir`'s config, tokenizer and other files,
    its weights interpolated with `start_dir`'s. Writes interpolation.json (the α, both sources)."""
    from safetensors.torch import save_file

    start, end, out = Path(start_dir), Path(end_dir), Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new directory (nothing is overwritten)")
    config = json.loads((end / "config.json").read_text())
    weights = interpolate(_load_weights(start), _load_weights(end), alpha, int(config["num_hidden_layers"]))
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(end, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    save_file(
        {k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"}
    )
    (tmp / "interpolation.json").write_text(
        json.dumps(
            {
                "alpha": alpha_label(alpha),
                "start": str(start.resolve()),
                "end": str(end.resolve()),
                **rule(alpha),
            },
            indent=2,
        )
    )
    tmp.rename(out)
    return out


# ---- in a run: θ from the engine, θ0 from the stage's start on disk ------------------------------------


def _start_index(directory: Path) -> Dict[str, Path]:
    """Tensor name -> the safetensors file of `directory` that holds it."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"regularizer.interpolation: {directory} has no *.safetensors; the stage's start "
            "(model.name_or_path) must be a Hugging Face directory with safetensors weights"
        )
    index = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            index.update({k: f for k in h.keys()})
    return index


@torch.no_grad()
def apply(engine, start_dir: str, alpha: Alpha, rank: int) -> None:
    """Set the engine's parameters to θ0 + α(θ − θ0), one parameter at a time. θ is the optimizer's fp32
    master copy, which this leaves untouched (α = 1 puts the trained weights back); θ0 is read from
    `start_dir` on rank 0 only, which writes the result that ZeRO-3 then re-partitions to every rank
    (deepspeed.zero.GatheredParameters). Collective: every rank calls it with the same α."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    from safetensors import safe_open

    module = engine.module
    num_layers = int(module.config.num_hidden_layers)
    index = _start_index(Path(start_dir)) if rank == 0 else {}
    handles = {}
    try:
        for name, p in module.named_parameters():
            theta = safe_get_full_fp32_param(p)  # collective: the full fp32 tensor on every rank
            if theta is None:  # frozen: not trained, nothing to interpolate
                continue
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    if name not in index:
                        raise KeyError(
                            f"regularizer.interpolation: {start_dir} has no tensor {name!r}; the stage's "
                            "start must be the same architecture as the model trained"
                        )
                    f = index[name]
                    if f not in handles:
                        handles[f] = safe_open(str(f), "pt")
                    theta0 = handles[f].get_tensor(name)
                    if theta0.shape != theta.shape:
                        raise ValueError(
                            f"regularizer.interpolation: {name} is {tuple(theta0.shape)} in {start_dir} "
                            f"but {tuple(theta.shape)} here (a resized vocabulary?)"
                        )
                    a = alpha_of(alpha, name, num_layers)
                    p.data.copy_(torch.lerp(theta0.float(), theta.float(), a).to(p.dtype).view_as(p.data))
    finally:
        handles.clear()


def choose(rows: List[Dict], keep_gain: float) -> Dict:
    """The row of the smallest α whose domain gain (`eval/domain_gain`) is >= keep_gain x the gain at
    α = 1 (which `rows` holds); α = 1 when training gained nothing on the domain set."""
    full = next(r for r in rows if r["alpha"] == 1.0)
    if full["eval/domain_gain"] <= 0:
        return full
    ok = [r for r in rows if r["eval/domain_gain"] >= keep_gain * full["eval/domain_gain"]]
    return min(ok, key=lambda r: r["alpha"])


def swept(alpha: float, beta: Optional[float]) -> Alpha:
    """What a swept α applies: α itself, or with regularizer.interpolation.beta LiNeS's (α, β). α = 1
    is always the trained weights (the row the others are measured against)."""
    return alpha if beta is None or alpha == 1.0 else lines(alpha, beta, "regularizer.interpolation")


def sweep(engine, cfg, baseline: Dict[str, float], score: Callable[[], Dict[str, float]], rank: int) -> Dict:
    """The end of a stage with regularizer.interpolation: score every α on the eval sets (plus α = 1),
    choose one (or take regularizer.interpolation.alpha) and leave the engine's weights at it for the
    export. With regularizer.interpolation.beta, each α < 1 is LiNeS's (α, β). Returns {"alpha",
    "rows", ...} as written to output_dir/interpolation.json. Collective."""
    from trainer.evaluate import forgetting_metrics

    i = cfg.regularizer.interpolation
    start = cfg.model.name_or_path
    rows: List[Dict] = []
    if i.alpha is None:
        for a in sorted(set(i.alphas) | {1.0}):
            apply(engine, start, swept(a, i.beta), rank)
            scores = score()
            scores.update(forgetting_metrics(scores, baseline))
            rows.append({"alpha": a, **scores})
            log.info(
                "interpolation %s: %s",
                alpha_label(swept(a, i.beta)),
                {k: round(v, 4) for k, v in scores.items() if "ppl" not in k},
            )
        chosen = choose(rows, i.keep_gain)
        alpha: Alpha = swept(chosen["alpha"], i.beta)
        how = (
            f"the smallest α keeping >= {i.keep_gain:g} of the domain gain at α=1 "
            f"({chosen['eval/domain_gain']:.4f} of "
            f"{next(r for r in rows if r['alpha'] == 1.0)['eval/domain_gain']:.4f})"
        )
    else:
        alpha, how = parse_alpha(i.alpha), "regularizer.interpolation.alpha"
    apply(engine, start, alpha, rank)
    log.info("interpolation: exporting %s (%s)", alpha_label(alpha), how)
    return {
        "alpha": alpha_label(alpha),
        "beta": i.beta if i.alpha is None else None,
        "chosen_by": how,
        "start": start,
        **rule(alpha),
        "rows": rows,
    }


def check(cfg, baseline_expected: bool) -> None:
    """Before anything is built: what the sweep needs is there."""
    i = cfg.regularizer.interpolation
    if not i.enabled:
        return
    if i.alpha is not None:
        try:
            parse_alpha(i.alpha)
        except ValueError as e:
            raise ValueError(f"regularizer.interpolation.alpha: {e}") from None
    if not cfg.model.name_or_path:
        raise ValueError(
            "regularizer.interpolation needs the stage's start on disk: set model.name_or_path to a "
            "pretrained Hugging Face directory (a random-init start has nothing to keep)"
        )
    if not cfg.trainer.export_hf:
        raise ValueError("regularizer.interpolation chooses what the stage exports: it needs trainer.export_hf=true")
    if i.alpha is None:
        if "domain" not in cfg.eval.sets:
            raise ValueError(
                f"regularizer.interpolation.alphas={list(i.alphas)} chooses α by the domain gain: add a "
                "held-out domain set (+eval.sets.domain=PATH), or export a fixed α with "
                "regularizer.interpolation.alpha=0.5"
            )
        if not baseline_expected:
            raise ValueError(
                "regularizer.interpolation.alphas measures the domain gain against the step-0 eval: "
                "keep eval.at_start=true"
            )


class Interpolation(Component):
    """The loop's component: after the last step (before the export), `sweep`, log each α's scores
    as interpolation/<α>/<metric>, write output_dir/interpolation.json and keep the result for the
    export (hf/interpolation.json). The checkpoint keeps the trained θ."""

    def __init__(self, engine, cfg, score: Callable[[], Dict[str, float]], rank: int) -> None:
        self.engine, self.cfg, self.score, self.rank = engine, cfg, score, rank
        self.result: Optional[Dict] = None

    def on_end(self, state, tracker) -> None:
        result = sweep(self.engine, self.cfg, state.baseline, self.score, self.rank)
        metrics = {f"interpolation/{r['alpha']:g}/{k}": v for r in result["rows"] for k, v in r.items() if k != "alpha"}
        if all(c in "0123456789." for c in result["alpha"]):
            metrics["interpolation/alpha"] = float(result["alpha"])
        elif result["alpha"].startswith("alpha="):  # LiNeS: its α (β is fixed by the config)
            metrics["interpolation/alpha"] = parse_alpha(result["alpha"]).alpha
        tracker.log(state.step, metrics)
        if self.rank == 0:
            (Path(self.cfg.output_dir) / "interpolation.json").write_text(json.dumps(result, indent=2))
        self.result = result


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(
        description="Write θ0 + α(θ − θ0) of a stage's start (θ0) and its export (θ) as a Hugging Face directory."
    )
    p.add_argument("start", help="the stage's starting model (its model.name_or_path)")
    p.add_argument("end", help="the stage's export (OUTPUT_DIR/hf)")
    p.add_argument("out", help="new directory for the interpolated model")
    p.add_argument(
        "--alpha",
        required=True,
        help="0.5; per depth group: bottom=0.25,middle=0.5,top=1; or LiNeS: alpha=0.25,beta=0.75",
    )
    args = p.parse_args(argv)
    try:
        alpha = parse_alpha(args.alpha)
    except ValueError as e:
        p.error(str(e))
    print(write_interpolated(args.start, args.end, alpha, args.out))


if __name__ == "__main__":
    main()
