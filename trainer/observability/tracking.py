"""What a person watches: metrics.jsonl, samples.jsonl, a W&B run, and the rank-0 console.

Only global rank 0 writes. Files: on resume from step S, lines after S (logged after the checkpoint
the job resumed from) are dropped from metrics.jsonl and samples.jsonl, since those steps are about
to be trained again: the files never have a gap or a duplicate.

W&B, one run per job, offline-first: mode = logger.mode, else WANDB_MODE, else online with
WANDB_API_KEY, else offline (`wandb sync output_dir/wandb/offline-run-*` later); an online start
that fails (no network) falls back to offline. The run id lives in output_dir/wandb_run.json, so a
resumed or requeued job continues the same run.

Why every row carries `trainer/step` and W&B's own step is a counter of ours: W&B drops a row
whose step is not above the run's last one ("Step must only increase"). A job killed at step 12
and resumed from the checkpoint at 10 logs steps 11 and 12 again, and a resumed offline segment
starts W&B's counter from 0 — logging with step=<trainer step> would lose those rows, online or at
`wandb sync`. So W&B's step is a row counter persisted in wandb_run.json (saved before each row is
handed to W&B, so it is never behind what W&B holds) and strictly increasing across segments;
`define_metric` makes `trainer/step` the x-axis of every namespace. Steps trained twice show
twice, as they happened.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

from trainer.components import Component
from trainer.config import LoggerConfig
from trainer.observability.redaction import redact_args

log = logging.getLogger("trainer")

NAMESPACES = ("train", "eval", "perf", "data", "reg", "samples", "rewards", "logps", "interpolation")
STEP_KEY = "trainer/step"
SAMPLES_KEY = "samples/generations"


class Tracker:
    def __init__(
        self,
        cfg: LoggerConfig,
        output_dir: str,
        exp_name: str,
        config_tree: Dict[str, Any],
        resume_step: int,
        enabled: bool,
        job_type: str = "train",
    ) -> None:
        self.enabled = enabled
        self.run = None
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        self.samples_path = out / "samples.jsonl"
        _drop_after(self.path, resume_step)
        self.samples = _drop_after(self.samples_path, resume_step)  # the W&B table shows them all
        self.file = open(self.path, "a", buffering=1)
        if cfg.backend == "wandb":
            self.state_path = out / "wandb_run.json"
            state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
            self.run_id = state.get("run_id") or uuid.uuid4().hex[:12]
            self.next_step = int(state.get("next_step", 0))
            self._save_state()
            self.run = _start_wandb(cfg, output_dir, exp_name, config_tree, self.run_id, job_type)
            # Online, a resumed run starts after the server's last row.
            self.next_step = max(self.next_step, int(getattr(self.run, "step", 0) or 0))

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.run is not None:
            self._wandb_log({STEP_KEY: step, **metrics})

    def log_samples(self, step: int, rows: List[Dict[str, str]]) -> None:
        """Generations at an eval: appended to samples.jsonl; W&B gets a table of every sample so far
        (columns step, prompt, completion), so the latest table reads as the model's history."""
        if not self.enabled or not rows:
            return
        rows = [{"step": step, **r} for r in rows]
        with open(self.samples_path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        self.samples.extend(rows)
        if self.run is not None:
            import wandb

            columns = ["step", "prompt", "completion"]
            table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in self.samples])
            self._wandb_log({STEP_KEY: step, SAMPLES_KEY: table})

    def _wandb_log(self, row: Dict[str, Any]) -> None:
        step = self.next_step
        self.next_step += 1
        self._save_state()
        self.run.log(row, step=step, commit=True)  # a row now, not when the next one arrives

    def _save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"run_id": self.run_id, "next_step": self.next_step}))
        os.replace(tmp, self.state_path)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.run is not None:
            import wandb

            self.run.finish()
            self.run = None
            wandb.teardown()  # finish() can return before the run file is flushed; this waits for it


def summarise(output_dir: str, baseline: Dict[str, float], dashboard: bool = True) -> None:
    """The end of a run (rank 0): the forgetting summary (first vs last eval of each set) in the
    log, and (logger.dashboard) the PNG dashboard in output_dir, with or without W&B."""
    from trainer.observability.dashboard import render

    rows = read_metrics(output_dir)
    last = {k: v for r in rows for k, v in r.items() if k.startswith("eval/")}
    for key in sorted(k for k in last if k.endswith("/loss")):
        if key in baseline:
            log.info(
                "summary %s: %.4f at the start -> %.4f at the end (%+.4f)",
                key,
                baseline[key],
                last[key],
                last[key] - baseline[key],
            )
    for key in ("eval/forgetting", "eval/domain_gain"):
        if key in last:
            log.info("summary %s: %+.4f", key, last[key])
    if not dashboard:
        return
    try:
        log.info("dashboard: %s", render(rows, Path(output_dir) / "dashboard.png", title=Path(output_dir).name))
    except Exception as ex:  # a plot must never fail a finished run
        log.warning("could not draw the dashboard: %s", ex)


def read_metrics(path) -> List[Dict[str, Any]]:
    """The rows of a metrics.jsonl (`path` is the file or the output_dir holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(rows: List[Dict[str, Any]], key: str) -> Dict[int, Any]:
    """step -> value of one metric (the last logged at each step)."""
    return {r["step"]: r[key] for r in rows if key in r}


def _drop_after(path: Path, resume_step: int) -> List[Dict[str, Any]]:
    """Keep the lines of a jsonl file with step <= resume_step (rewriting it); returns them."""
    if not path.exists():
        return []
    kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [row for row in kept if row.get("step", 0) <= resume_step]
    path.write_text("".join(json.dumps(row) + "\n" for row in kept))
    return kept


def resolve_mode(cfg: LoggerConfig, env: Dict[str, str]) -> str:
    return cfg.mode or env.get("WANDB_MODE") or ("online" if env.get("WANDB_API_KEY") else "offline")


def _start_wandb(
    cfg: LoggerConfig, output_dir: str, exp_name: str, config_tree: Dict[str, Any], run_id: str, job_type: str
):
    import wandb

    mode = resolve_mode(cfg, dict(os.environ))
    kwargs = dict(
        project=cfg.project,
        entity=cfg.entity,
        group=cfg.group or exp_name,
        name=cfg.name or Path(output_dir).resolve().name,
        tags=list(cfg.tags),
        config=config_tree,
        dir=output_dir,
        id=run_id,
        resume="allow",
        job_type=job_type,
    )
    argv = sys.argv
    sys.argv = argv[:1] + redact_args(argv[1:])  # W&B reads the arguments at init
    try:
        try:
            run = wandb.init(mode=mode, **kwargs)
        except Exception as ex:  # no network, bad key, server down: keep training, sync later
            if mode != "online":
                raise
            log.warning("W&B online start failed (%s: %s); logging offline instead", type(ex).__name__, ex)
            wandb.teardown()  # the failed attempt still holds the run id in W&B's service
            mode = "offline"
            run = wandb.init(mode=mode, **kwargs)
    finally:
        sys.argv = argv
    run.define_metric(STEP_KEY)
    for ns in NAMESPACES:
        run.define_metric(f"{ns}/*", step_metric=STEP_KEY)
    log.info("W&B run %s (%s) in %s", run_id, mode, Path(output_dir) / "wandb")
    return run


class Progress:
    """Rank 0's console: a tqdm bar (step, loss, tokens/s, ETA) when stderr is a terminal, and one
    log line per log step either way (with the ETA, for batch logs where a bar would be noise)."""

    def __init__(self, start_step: int, max_steps: int, enabled: bool) -> None:
        self.enabled = enabled
        self.start_step, self.max_steps = start_step, max_steps
        self.started = time.perf_counter()
        self.bar = None
        self._stack = contextlib.ExitStack()
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False)
            self._stack.enter_context(logging_redirect_tqdm())  # log lines print above the bar

    def eta_s(self, step: int) -> Optional[float]:
        done = step - self.start_step
        if done <= 0:
            return None
        return (time.perf_counter() - self.started) / done * (self.max_steps - step)

    def update(self, step: int) -> None:
        """Every step: move the bar."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        """On log steps: one line, and the bar's loss and tokens/s."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{metrics['train/loss']:.4f}", tok_s=f"{metrics.get('perf/tokens_per_s', 0):.0f}", refresh=False
            )
        log.info(
            "step %d/%d  loss %.4f  lr %.2e  grad_norm %.3f  %.0f tok/s  ETA %s",
            step,
            self.max_steps,
            metrics["train/loss"],
            metrics["train/lr"],
            metrics["train/grad_norm"],
            metrics.get("perf/tokens_per_s", float("nan")),
            _hms(self.eta_s(step)),
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self._stack.close()


def _hms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class LogWindow(Component):
    """Every trainer.cadence.log_every_steps steps (and at the last): one line describing the steps since the
    previous line (MetricWindow), with the counters and perf's numbers, to the tracker and the
    console; the console's progress bar moves every step. Collective: perf gathers every rank's memory."""

    def __init__(self, window, perf, every_steps: int, max_steps: int, enabled: bool) -> None:
        self.window, self.perf, self.every_steps = window, perf, every_steps
        self.max_steps, self.enabled = max_steps, enabled
        self.progress: Optional[Progress] = None

    def on_start(self, state, tracker: Tracker) -> None:
        self.progress = Progress(state.step, self.max_steps, enabled=self.enabled)

    def after_step(self, state, tracker: Tracker, last: bool) -> None:
        self.progress.update(state.step)
        if state.step % self.every_steps and not last:
            return
        metrics = {
            **self.window.summary(),
            "train/skipped_steps": state.skipped_steps,
            "train/tokens_seen": state.tokens_seen,
            "train/supervised_tokens_seen": state.supervised_tokens_seen,
            **self.perf.metrics(),
        }
        tracker.log(state.step, metrics)
        self.progress.log(state.step, metrics)  # one line per log step (and the bar on a terminal)

    def on_stop(self, state) -> None:
        self.progress.close()

    def on_end(self, state, tracker: Tracker) -> None:
        self.progress.close()


class Summary(Component):
    """The end of a run, on rank 0: the forgetting summary in the log and the PNG dashboard."""

    def __init__(self, output_dir: str, dashboard: bool, enabled: bool) -> None:
        self.output_dir, self.dashboard, self.enabled = output_dir, dashboard, enabled

    def on_end(self, state, tracker: Tracker) -> None:
        if self.enabled:
            summarise(self.output_dir, state.baseline, dashboard=self.dashboard)
