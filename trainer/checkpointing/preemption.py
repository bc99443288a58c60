"""Stopping early without losing work: preemption notices, cancellation and a time budget.

A cluster tells a job to go before it kills it. Slurm sends USR1 a grace period before the walltime
(`#SBATCH --signal=B:USR1@300`, forwarded to every rank by slurm/common.sh; submitit, behind the
Hydra sweep launcher, sends USR2) and TERM when the job is preempted or cancelled (then KILL after
the cluster's KillWait). `trainer.max_time` is the same kind of deadline, kept by the trainer
itself. In every case the loop finishes the step it is in, saves a checkpoint at that step and
exits cleanly; what happens next depends on why:

    USR1, USR2       a walltime or preemption notice: after the save, rank 0 requeues the job
                     (`scontrol requeue $SLURM_JOB_ID`); the requeued job resumes from the save.
    trainer.max_time the same (requeued when running in a Slurm job, else rerun by hand).
    TERM             cancellation (`scancel`), or a preemption Slurm requeues by itself: no requeue.

A signal reaches the ranks at different moments, and a rank must not stop alone while the others
wait in a collective. So a signal handler only sets a flag, and at every step boundary all ranks
sum their flags (one small all-reduce): they stop at the same step or not at all. A second TERM or
USR1 while a stop is under way gets the default action (the process ends at once).

The pure parts (the max_time decision; durations are parsed by trainer/config.py) import nothing heavy.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from typing import Callable, List, Optional

from trainer.config import parse_duration  # the format of trainer.max_time lives with the config

log = logging.getLogger("trainer")

# Reasons, in the order they win when ranks disagree: a cancellation is never turned into a requeue.
TERM, USR1, MAX_TIME = 0, 1, 2
_REASONS = {
    TERM: "SIGTERM (cancelled or preempted)",
    USR1: "SIGUSR1/SIGUSR2 (walltime or preemption notice)",
    MAX_TIME: "trainer.max_time reached",
}
_SIGNALS = {signal.SIGTERM: TERM, signal.SIGUSR1: USR1, signal.SIGUSR2: USR1}
# After a requeue Slurm ends the job within seconds; until then rank 0 waits rather than exit 0,
# so that no wrapper (submitit writes its result when the function returns) takes the run as done.
REQUEUE_WAIT_S = 300


def out_of_time(elapsed_s: float, longest_step_s: float, budget_s: Optional[float]) -> bool:
    """Stop now if one more step, as long as the longest seen so far, would end past the budget.

    With a budget of 100 s, 90 s gone and steps of up to 8 s, the next step would end at 98 s: go on.
    At 93 s it would end at 101 s: stop (and save) now.
    """
    return budget_s is not None and elapsed_s + longest_step_s > budget_s


def decide(summed_flags: List[float]) -> Optional[int]:
    """The reason to stop from the flags summed over ranks ([term, usr1, max_time]), None to go on.
    TERM wins: if one rank saw a cancellation and another a walltime notice, we must not requeue.

    >>> decide([0, 2, 1])   # every rank got USR1, one also ran out of time
    1
    """
    raised = [i for i, v in enumerate(summed_flags) if v > 0]
    return raised[0] if raised else None


class Preemption:
    """Flags set by signals and the clock; `requested` turns them into one decision for all ranks."""

    def __init__(self, max_time_s: Optional[float], clock: Callable[[], float] = time.monotonic) -> None:
        self.max_time_s = max_time_s
        self.clock = clock
        self.started = clock()
        self.last_check: Optional[float] = None
        self.longest_step_s = 0.0
        self.signalled: Optional[int] = None
        self.reason: Optional[int] = None

    def _on_signal(self, signum: int, frame) -> None:
        if self.signalled is not None:  # asked twice: stop trying to be graceful
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signalled = _SIGNALS[signum]
        # No logging here: a handler can interrupt a logging call that holds its lock.
        os.write(
            2,
            f"[rank {os.environ.get('RANK', '?')}] got {signal.Signals(signum).name}: stopping after "
            "this step, with a checkpoint\n".encode(),
        )

    def local_flags(self) -> list:
        """[term, usr1, max_time] as 0/1 for this rank, and the step-time bookkeeping behind max_time."""
        now = self.clock()
        if self.last_check is not None:
            self.longest_step_s = max(self.longest_step_s, now - self.last_check)
        self.last_check = now
        flags = [0, 0, 0]
        if self.signalled is not None:
            flags[self.signalled] = 1
        if out_of_time(now - self.started, self.longest_step_s, self.max_time_s):
            flags[MAX_TIME] = 1
        return flags

    def requested(self, device) -> bool:
        """Collective (every rank calls it at the same step): True on every rank if any rank was
        signalled or is out of time."""
        import torch

        from trainer import distributed

        flags = torch.tensor(self.local_flags(), dtype=torch.float32, device=device)
        distributed.all_reduce_sum(flags)
        self.reason = decide(flags.tolist())
        return self.reason is not None

    def finish(self, step: int, rank: int, device) -> None:
        """Collective, after the save: say why we stopped. When the job should go on (USR1/USR2 or
        max_time inside a Slurm job), rank 0 requeues it and every rank waits for the TERM with
        which Slurm ends this attempt, then exits 0 at once: all is saved, and no wrapper (torchrun,
        submitit) gets to see a rank fail or a run end early."""
        assert self.reason is not None
        job = os.environ.get("SLURM_JOB_ID")
        requeue = self.reason in (USR1, MAX_TIME) and job is not None
        for signum in _SIGNALS:
            signal.signal(signum, _exit_quietly)
        if rank == 0:
            what = (
                f"requeueing Slurm job {job}; it resumes from this step"
                if requeue
                else "rerun the same command (same output_dir) to resume from this step"
            )
            log.warning("STOPPED EARLY at step %d: %s; checkpoint saved; %s", step, _REASONS[self.reason], what)
        if not requeue:
            return
        import torch

        from trainer import distributed

        requeued = torch.tensor([1.0 if rank == 0 and _requeue(job) else 0.0], device=device)
        distributed.all_reduce_sum(requeued)
        if requeued.item() > 0:
            time.sleep(REQUEUE_WAIT_S)
            log.error("job %s was requeued but this attempt was not ended within %d s; exiting", job, REQUEUE_WAIT_S)


def _exit_quietly(signum: int, frame) -> None:
    # Not sys.exit: interpreter teardown of a live process group can abort (gloo threads), and
    # Python restores the default TERM action while finalizing.
    os._exit(0)


def _requeue(job: str) -> bool:
    # Slurm cancels this job the moment the requeue is accepted (every checkpoint file is already on
    # disk) and starts it again, same job id, once the node is free and the old credential expired.
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as ex:
        log.error("scontrol requeue %s failed (%s): resubmit the same command to resume", job, ex)
        return False
    if proc.returncode != 0:
        log.error(
            "scontrol requeue %s failed: %s: resubmit the same command to resume (the job may "
            "have been submitted with --no-requeue)",
            job,
            (proc.stderr or proc.stdout).strip(),
        )
        return False
    return True


_ACTIVE: Optional[Preemption] = None


def install(max_time: Optional[str]) -> Preemption:
    """Start the clock for `max_time` and catch USR1, USR2 and TERM in this process (main thread).

    Once per process: the stages of a recipe (several fit() calls) share the clock, so max_time
    bounds the whole job, and a signal that arrives between two stages stops the next one."""
    global _ACTIVE
    budget = parse_duration(max_time) if max_time is not None else None
    if _ACTIVE is None:
        _ACTIVE = Preemption(budget)
    else:
        _ACTIVE.max_time_s = budget
        _ACTIVE.last_check = None  # the gap between stages is not a training step
    for signum in _SIGNALS:
        signal.signal(signum, _ACTIVE._on_signal)
    return _ACTIVE
