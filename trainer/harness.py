"""Task-level evaluation with lm-eval-harness (eval.harness): lm-eval's own tasks, prompts and metrics,
scored by the live ZeRO-3 engine, at a stage's start, every eval.harness.every_steps, and its end.
Logged as eval/harness/<task>/<metric> (metrics.jsonl, W&B, the PNG); every evaluation's results and
per-item outputs go to output_dir/harness/step_<N>.json and step_<N>_samples.jsonl.

How it runs under ZeRO-3: no rank holds the whole model, so every rank runs lm-eval in full (the same
tasks, the same requests in the same order: lm-eval builds them deterministically) and `EngineLM`
answers each request list collectively. The requests are split across ranks, every rank runs the
same number of forwards (a rank with nothing left runs a fully masked row, as in trainer/evaluate.py)
and the answers are gathered, so each rank hands lm-eval the full list. lm-eval sees one process
(rank 0 of 1) and computes the metrics itself, on every rank; rank 0 logs them.

Loglikelihood requests are packed: contexts + continuations of several requests share a row, each
with position_ids from 0 (documents isolated as in training), best-fit-decreasing into rows of
eval.harness.max_length tokens, and scored through the chunked LM head (trainer/objectives/head.py:
the log-probability of each continuation token and whether it is the greedy choice), never the full
[tokens x vocab] logits. Tokenisation follows lm-eval's HFLM (`lm_eval --model hf`), so a task's
numbers equal the CLI's on the stage's Hugging Face export (tests/distributed/test_harness.py).
Generation (generate_until) is batched with a KV cache, greedy unless the task asks to sample, every
rank stepping until all are done (synced_gpus).

Tasks: the bundled ones in trainer/harness_tasks/ (fullft_general, fullft_computing, fullft_medical,
fullft_ifeval), lm-eval's own by name, and a user's YAML tasks from eval.harness.include_path.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import lm_eval
import numpy as np
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.tasks import TaskManager

from data_pipeline.packing import IGNORE, best_fit_decreasing, pack_rows
from trainer import distributed
from trainer.components import Component
from trainer.objectives import head
from trainer.observability.generation import generate_left_padded

log = logging.getLogger("trainer")

BUNDLED_TASKS = Path(__file__).resolve().parent / "harness_tasks"
"""The bundled task definitions (lm-eval YAML over local .jsonl files): always on the include path."""


class EngineLM(TemplateLM):
    """lm-eval's model API over a DeepSpeed engine (every rank calls every method together)."""

    def __init__(
        self,
        engine,
        tokenizer,
        device: torch.device,
        max_length: int,
        rows: int,
        gen_batch_size: int,
        max_gen_toks: int = 256,
    ) -> None:
        super().__init__()  # lm-eval's rank 0 of 1: the split across ranks is ours (module docstring)
        self.engine, self.tokenizer, self._device = engine, tokenizer, device
        self.max_length, self.rows, self.gen_batch_size = max_length, rows, gen_batch_size
        self.max_gen_toks = max_gen_toks
        self.dist_rank, self.dist_world = distributed.rank(), distributed.world_size()
        self.truncated = 0  # requests cut from the left to max_length (logged after each evaluation)
        self.forwards = 0

    # ---- tokenisation, as lm-eval's HFLM does it ----------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> List[int]:
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        return self.tokenizer.encode(string, **special)

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(self, chat_history: List[Dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    # ---- scoring ------------------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = True):
        return super().loglikelihood(requests, disable_tqdm=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> List[Tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is greedy) of each (key, context tokens,
        continuation tokens), packed into rows and split across ranks."""
        samples, spans = [], []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError("lm-eval sent a request with an empty continuation")
            ids = (list(context) + list(continuation))[-(self.max_length + 1) :]
            self.truncated += len(context) + len(continuation) > len(ids)
            n = min(len(continuation), len(ids) - 1)
            samples.append((ids, [IGNORE] * (len(ids) - n) + ids[-n:]))
            spans.append(n)
        width = self.max_length + 1  # a request's tokens: its input and the last token it predicts
        bins = best_fit_decreasing([len(ids) for ids, _ in samples], width)
        batches = [bins[i : i + self.rows] for i in range(0, len(bins), self.rows)]
        mine: Dict[int, Tuple[float, bool]] = {}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        for first in range(0, len(batches), self.dist_world):
            at = first + self.dist_rank
            members = batches[at] if at < len(batches) else [[0]]
            ids, labels, positions, filled = pack_rows(samples, members, width, pad)
            keep = max(int(filled.max()), 2)
            batch = {
                "input_ids": torch.from_numpy(ids[:, :keep]),
                "labels": torch.from_numpy(
                    labels[:, :keep] if at < len(batches) else np.full_like(labels[:, :keep], IGNORE)
                ),
                "position_ids": torch.from_numpy(positions[:, :keep]),
            }
            scored = self._scored(batch)
            self.forwards += 1
            if at >= len(batches):
                continue
            for r, row in enumerate(members):
                start = 0
                for i in row:
                    end = start + len(samples[i][0])
                    part = scored[r, end - 1 - spans[i] : end - 1]  # the predictions of the continuation
                    mine[i] = (float(part[:, 0].double().sum()), bool(part[:, 1].all()))
                    start = end
        merged = {k: v for part in distributed.all_gather_object(mine) for k, v in part.items()}
        return [merged[i] for i in range(len(requests))]

    def _scored(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The model in eval mode (no dropout), as lm-eval's HF model scores; training mode after."""
        was_training = self.engine.module.training
        self.engine.eval()
        try:
            return head.continuation_logprobs(self.engine, batch, self.engine.device).cpu()
        finally:
            if was_training:
                self.engine.train()

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Perplexity tasks: each text in disjoint windows of max_length tokens (as HFLM), summed."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string)
            for context, continuation in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1
                ),
            ):
                windows.append((None, context, continuation))
                owner.append(i)
        sums = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows)):
            sums[i] += ll
        return sums

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Completions of each (context, generation kwargs), as HFLM makes them: the kwargs normalised
        by lm-eval, generation stopped at the task's `until` strings or the end-of-sequence token and
        the text cut at the first of them."""
        groups: Dict[str, List[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        mine: Dict[int, str] = {}
        for key, members in groups.items():
            kwargs = normalize_gen_kwargs(json.loads(key), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise ValueError(
                    f"lm-eval task asks for {max_new} new tokens (max_gen_toks) but eval.harness.max_length is "
                    f"{self.max_length}: prompt and generation must fit; raise eval.harness.max_length or lower "
                    f"max_gen_toks (eval.harness.gen_kwargs)"
                )
            prompts = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - max_new) :] for i in members}
            order = sorted(members, key=lambda i: -len(prompts[i]))
            batches = [order[s : s + self.gen_batch_size] for s in range(0, len(order), self.gen_batch_size)]
            for first in range(0, len(batches), self.dist_world):
                at = first + self.dist_rank
                chunk = batches[at] if at < len(batches) else order[:1]
                texts = self._generate([prompts[i] for i in chunk], max_new, until, kwargs)
                if at < len(batches):
                    for i, text in zip(chunk, texts):
                        mine[i] = postprocess_generated_text(text, until, None)
        merged = {k: v for part in distributed.all_gather_object(mine) for k, v in part.items()}
        return [merged[i] for i in range(len(requests))]

    def _generate(self, prompts: Sequence[List[int]], max_new: int, until: List[str], kwargs: Dict) -> List[str]:
        tok = self.tokenizer
        kwargs = dict(kwargs)
        sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        if sample and temperature > 0:
            kwargs["temperature"] = temperature
        elif not sample:  # greedy: sampling knobs would only draw warnings
            kwargs = {k: v for k, v in kwargs.items() if k not in ("top_p", "top_k", "min_p")}
        rows = generate_left_padded(
            self.engine, list(prompts), tok, max_new,
            do_sample=sample, stop_strings=[u for u in until if u] or None, tokenizer=tok, **kwargs,
        )  # fmt: skip
        self.forwards += 1
        ends = {tok.eos_token_id} | set(_as_list(getattr(self.engine.module.generation_config, "eos_token_id", None)))
        texts = []
        for row in rows:
            cut = next((n for n, t in enumerate(row) if t in ends), len(row))
            texts.append(tok.decode(row[:cut], skip_special_tokens=True))
        return texts


def _as_list(value) -> List[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def task_manager(include_path: Sequence[str], names: Sequence[str] = ()) -> TaskManager:
    """lm-eval's task index over the bundled tasks and the user's directories, and lm-eval's own
    tasks when `names` asks for one of them (indexing those takes ~9 s on 2 cores)."""
    paths = [str(BUNDLED_TASKS)] + [str(Path(p).expanduser().resolve()) for p in include_path]
    for p in paths[1:]:
        if not Path(p).is_dir():
            raise ValueError(f"eval.harness.include_path: {p} is not a directory of lm-eval task YAML files")
    local = TaskManager(include_path=paths, include_defaults=False)
    if all(local.match_tasks([n]) for n in names):
        return local
    return TaskManager(include_path=paths)


def check_tasks(names: Sequence[str], manager: TaskManager, chat: bool = False, tokenizer=None) -> None:
    """Every task name known to lm-eval, else a clear stop naming it (before any model is built); chat
    tasks need a tokenizer with a chat template."""
    if chat and names and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"eval.harness.chat_tasks={list(names)}: the tokenizer {tokenizer.name_or_path!r} has no chat "
            "template; set model.chat_template, or list these tasks under eval.harness.tasks (plain prompts)"
        )
    unknown = [n for n in names if not manager.match_tasks([n])]
    if unknown:
        raise ValueError(
            f"eval.harness: unknown lm-eval task(s) {unknown}; the bundled ones are "
            f"{sorted(p.stem for p in BUNDLED_TASKS.glob('*.yaml'))} ({BUNDLED_TASKS}), `lm_eval ls tasks` "
            "lists lm-eval's own, and eval.harness.include_path adds directories of your own task YAML files"
        )


def metrics_of(results: Dict) -> Dict[str, float]:
    """lm-eval's results as eval/harness/<task>/<metric> (a filter other than `none` is appended:
    <metric>_<filter>; standard errors as <metric>_stderr)."""
    out: Dict[str, float] = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric}_{filt}"
            if name.endswith("_stderr") or metric.endswith("_stderr"):
                name = name.replace("_stderr", "") + "_stderr"
            out[f"eval/harness/{task}/{name}"] = float(value)
    return out


@contextlib.contextmanager
def _rng_kept():
    """lm-eval seeds Python's, NumPy's and torch's generators (its seeds: eval.harness.seed); training
    goes on with the states it had, so a run with evaluations draws as one without."""
    import random

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class _DropNotice(logging.Filter):
    """lm-eval's notice, for every task with a custom_dataset loader (the bundled ones), that it could
    take `--metadata` arguments: nothing to act on here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval at WARNING, without its per-task progress bars (one per task and rank, in every
    evaluation of a training log) and the notice above; restored afterwards."""
    import lm_eval.api.task as task_module

    logger, bars, notice = logging.getLogger("lm_eval"), task_module.tqdm, _DropNotice()
    level = logger.level
    logger.setLevel(logging.WARNING)
    logging.getLogger("lm_eval.api.task").addFilter(notice)
    task_module.tqdm = functools.partial(bars, disable=True)
    try:
        yield
    finally:
        task_module.tqdm = bars
        logging.getLogger("lm_eval.api.task").removeFilter(notice)
        logger.setLevel(level)


class HarnessEvaluation(Component):
    """eval.harness's tasks at step 0 (with eval.at_start), every `every_steps` and at the last step.
    Collective: every rank calls at the same steps (trainer/components.py)."""

    def __init__(self, lm: EngineLM, cfg, manager: TaskManager, output_dir: str, at_start: bool, is_main: bool) -> None:
        self.lm, self.cfg, self.manager, self.at_start, self.is_main = lm, cfg, manager, at_start, is_main
        self.out = Path(output_dir) / "harness"

    def scores(self, step: int) -> Dict[str, float]:
        """Every task's metrics now (on rank 0; other ranks take part and get {}). Collective."""
        started, self.lm.forwards, self.lm.truncated = time.perf_counter(), 0, 0
        metrics: Dict[str, float] = {}
        with _quiet_lm_eval(), _rng_kept():
            for tasks, chat in ((self.cfg.tasks, False), (self.cfg.chat_tasks, True)):
                if not tasks:
                    continue
                results = lm_eval.simple_evaluate(
                    model=self.lm,
                    tasks=list(tasks),
                    num_fewshot=self.cfg.num_fewshot,
                    limit=self.cfg.limit,
                    apply_chat_template=chat,
                    task_manager=self.manager,
                    bootstrap_iters=self.cfg.bootstrap_iters,
                    gen_kwargs=self.cfg.gen_kwargs,
                    log_samples=True,
                    random_seed=self.cfg.seed,
                    numpy_random_seed=self.cfg.seed,
                    torch_random_seed=self.cfg.seed,
                    fewshot_random_seed=self.cfg.seed,
                )
                if results is not None and self.is_main:
                    metrics.update(metrics_of(results))
                    self._write(step, results, chat)
        if self.is_main:
            log.info(
                "lm-eval at step %d: %d forwards in %.1f s%s: %s",
                step,
                self.lm.forwards,
                time.perf_counter() - started,
                f" ({self.lm.truncated} request(s) cut from the left to eval.harness.max_length)"
                if self.lm.truncated
                else "",
                {k.removeprefix("eval/harness/"): round(v, 4) for k, v in metrics.items() if not k.endswith("_stderr")},
            )
        return metrics

    def _write(self, step: int, results: Dict, chat: bool) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        suffix = "_chat" if chat else ""
        summary = {k: results.get(k) for k in ("results", "versions", "n-shot", "n-samples", "configs")}
        (self.out / f"step_{step:06d}{suffix}.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
        with open(self.out / f"step_{step:06d}{suffix}_samples.jsonl", "w", encoding="utf-8") as f:
            for task, items in results.get("samples", {}).items():
                for item in items:
                    keep = {k: item.get(k) for k in ("doc_id", "target", "arguments", "filtered_resps")}
                    f.write(json.dumps({"task": task, **keep}, default=str) + "\n")

    def on_start(self, state, tracker) -> None:
        if state.step == 0 and self.at_start:
            tracker.log(0, self.scores(0))

    def after_step(self, state, tracker, last: bool) -> None:
        every = self.cfg.every_steps
        if last or (every and state.step % every == 0):
            tracker.log(state.step, self.scores(state.step))
