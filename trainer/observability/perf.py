"""Performance numbers of a run: throughput, MFU, step-time breakdown, peak memory per rank, and
warnings on loss or gradient-norm spikes.

The FLOPs model, the peak-FLOPs table and the spike rule are pure functions (tested on literal
numbers). `PerfMeter` times the loop's phases on every rank and turns them into `perf/*` metrics at
log steps; `metrics()` is a collective (peak memory is gathered from every rank), so every rank
calls it at the same steps.
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import statistics
import time
from collections import deque
from typing import Deque, Dict, Iterator, List, Optional

log = logging.getLogger("trainer")

# Dense (no sparsity) bf16 tensor-core peak of one GPU, from NVIDIA's data sheets. Matched against
# torch.cuda.get_device_name() in this order, so the specific variants come before the family.
PEAK_BF16_FLOPS = (
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12),  # SXM and PCIe alike
)

# Per-rank metrics (perf/rank<R>/peak_mem_gb) up to this world size; beyond it only max and min,
# so a 512-GPU run does not write 512 keys per log line.
MAX_PER_RANK_KEYS = 16


def peak_flops(device_name: str, bf16: bool) -> Optional[float]:
    """Peak FLOP/s of one device, or None where unknown (CPU, fp32, an unlisted GPU): MFU is then
    omitted rather than computed against a guess."""
    if not bf16:
        return None
    for marker, flops in PEAK_BF16_FLOPS:
        if marker.lower() in device_name.lower():
            return flops
    return None


def flops_per_token(matmul_params: int, num_layers: int, attn_dim: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weight matmuls (2 forward + 4 backward per parameter)
    plus attention scores and values, 12 * layers * attn_dim * seq_len (QK^T and AV cost
    2 * seq_len * attn_dim each per token forward, x3 with backward).

    The attention term counts the full row, as PaLM and torchtitan do: sdpa/eager compute the whole
    seq_len x seq_len score matrix and mask it, so packed documents do not make it cheaper here.
    Worked example: N = 1e6, 2 layers, attn_dim 64, seq_len 128:
    6e6 + 12 * 2 * 64 * 128 = 6e6 + 196,608 = 6,196,608 FLOPs per token.
    """
    return 6.0 * matmul_params + 12.0 * num_layers * attn_dim * seq_len


def mfu(tokens_per_s_per_device: float, flops_per_token_: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s of one device over its peak."""
    return tokens_per_s_per_device * flops_per_token_ / peak


def model_flops_per_token(model, seq_len: int) -> float:
    """`flops_per_token` for a Hugging Face causal LM, correct under ZeRO-3 (ds_numel) and with tied
    embeddings. N counts the parameters used in matmuls: all of them except the input embedding
    (a lookup), unless it is tied to the output projection (then it is that matmul's weight)."""
    from trainer.engine.model import count_parameters

    cfg = model.config
    embed = model.get_input_embeddings().weight
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    matmul = count_parameters(model) - (0 if tied else getattr(embed, "ds_numel", embed.numel()))
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return flops_per_token(matmul, cfg.num_hidden_layers, heads * head_dim, seq_len)


# ---- spikes ----------------------------------------------------------------------------------


def is_spike(history: List[float], value: float, z: float, rel: float, min_history: int) -> bool:
    """A value is a spike when it is not finite, or (with at least min_history earlier values) lies
    above the recent median by both z robust standard deviations (1.4826 * MAD) and `rel` of the
    median. The relative floor keeps a flat, noise-free history from flagging tiny wiggles.
    Example: history [2.0, 2.1, 1.9, 2.0, 2.0], z=6, rel=0.1: median 2.0, MAD 0 -> sigma 0,
    threshold max(2.0 + 0, 2.0 * 1.1) = 2.2; 2.5 is a spike, 2.15 is not."""
    if not math.isfinite(value):
        return True
    if len(history) < min_history:
        return False
    median = statistics.median(history)
    sigma = 1.4826 * statistics.median(abs(h - median) for h in history)
    return value > median + z * sigma and value > median + rel * abs(median)


class SpikeWatch:
    """Warns (rank 0) when train/loss or train/grad_norm spikes. One line per spike, but at most one
    per metric per `cooldown` steps; the next line says how many were held back."""

    RULES = {"train/loss": (6.0, 0.1), "train/grad_norm": (6.0, 1.0)}  # (z, rel): grad norms are noisier

    def __init__(self, enabled: bool, window: int = 50, min_history: int = 10, cooldown: int = 50) -> None:
        self.enabled = enabled
        self.min_history, self.cooldown = min_history, cooldown
        self.history: Dict[str, Deque[float]] = {k: deque(maxlen=window) for k in self.RULES}
        self.last_warned: Dict[str, int] = {}
        self.held_back: Dict[str, int] = {k: 0 for k in self.RULES}

    def update(self, step: int, metrics: Dict[str, float]) -> List[str]:
        """Check one step's values; returns (and logs) the warnings it issued."""
        if not self.enabled:
            return []
        said = []
        for key, (z, rel) in self.RULES.items():
            if key not in metrics:
                continue
            value, past = float(metrics[key]), self.history[key]
            if is_spike(list(past), value, z, rel, self.min_history):
                if step - self.last_warned.get(key, -(10**9)) < self.cooldown:
                    self.held_back[key] += 1
                else:
                    median = statistics.median(past) if past else float("nan")
                    held = self.held_back[key]
                    more = f" ({held} more since step {self.last_warned[key]})" if held else ""
                    said.append(f"{key} spike at step {step}: {value:.4g} vs recent median {median:.4g}{more}")
                    log.warning(said[-1])
                    self.last_warned[key], self.held_back[key] = step, 0
            if math.isfinite(value):
                past.append(value)
        return said


# ---- the meter the loop calls -------------------------------------------------------------------


class PerfMeter:
    """Times each step's phases (data wait, forward/backward, optimizer) and reports averages over
    the steps since the previous report. On a GPU each phase ends with a device synchronize, or
    the time of queued kernels would land in whichever phase happens to wait for them."""

    PHASES = ("data_wait", "forward_backward", "optimizer")

    def __init__(
        self, flops_per_token_: Optional[float], peak: Optional[float], world_size: int, rank: int, on_gpu: bool
    ) -> None:
        self.flops_per_token, self.peak = flops_per_token_, peak
        self.world_size, self.rank, self.on_gpu = world_size, rank, on_gpu
        self.spikes = SpikeWatch(enabled=rank == 0)
        self._reset()

    @classmethod
    def for_model(cls, model, seq_len: int, world_size: int, rank: int, on_gpu: bool, bf16: bool) -> "PerfMeter":
        peak = None
        if on_gpu:
            import torch

            peak = peak_flops(torch.cuda.get_device_name(), bf16)
        return cls(model_flops_per_token(model, seq_len), peak, world_size, rank, on_gpu)

    def _reset(self) -> None:
        self.window_steps, self.window_s, self.window_tokens = 0, 0.0, 0.0
        self.phase_s = {p: 0.0 for p in self.PHASES}
        self._started: Optional[float] = None

    def _sync(self) -> None:
        if self.on_gpu:
            import torch

            torch.cuda.synchronize()

    def begin_step(self) -> None:
        self._started = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.phase_s[name] += time.perf_counter() - start

    def end_step(self, step: int, tokens: float, metrics: Dict[str, float]) -> None:
        """Close the step: its tokens (all ranks) count towards throughput; loss and grad norm are
        checked for spikes."""
        assert self._started is not None, "end_step without begin_step"
        self.window_s += time.perf_counter() - self._started
        self.window_steps += 1
        self.window_tokens += tokens
        self._started = None
        self.spikes.update(step, metrics)

    def metrics(self) -> Dict[str, float]:
        """perf/* over the steps since the last call. Collective: every rank must call it."""
        import torch

        from trainer import distributed

        steps, seconds = max(self.window_steps, 1), max(self.window_s, 1e-9)
        tokens_per_s = self.window_tokens / seconds
        out = {
            "perf/step_time_s": seconds / steps,
            "perf/tokens_per_s": tokens_per_s,
            "perf/tokens_per_s_per_device": tokens_per_s / self.world_size,
            "perf/data_wait_pct": 100.0 * self.phase_s["data_wait"] / seconds,
        }
        out.update({f"perf/{p}_s": self.phase_s[p] / steps for p in self.PHASES})
        if self.peak and self.flops_per_token:
            out["perf/mfu"] = mfu(tokens_per_s / self.world_size, self.flops_per_token, self.peak)
        mem = torch.zeros(self.world_size, dtype=torch.float64)
        mem[self.rank] = peak_memory_gb(self.on_gpu)
        distributed.all_reduce_sum(mem)
        out["perf/peak_mem_gb"] = float(mem.max())
        out["perf/peak_mem_gb_min"] = float(mem.min())
        if self.world_size <= MAX_PER_RANK_KEYS:
            out.update({f"perf/rank{r}/peak_mem_gb": float(v) for r, v in enumerate(mem.tolist())})
        self._reset()
        return out


def peak_memory_gb(on_gpu: bool) -> float:
    """This process's peak memory: CUDA max allocated on a GPU, peak resident set size on CPU."""
    if on_gpu:
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
