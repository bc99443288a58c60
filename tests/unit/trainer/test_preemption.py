"""trainer/checkpointing/preemption.py: durations, the max_time decision, signal flags."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from helpers import ROOT
from trainer.checkpointing import preemption
from trainer.checkpointing.preemption import MAX_TIME, TERM, USR1, Preemption, decide, out_of_time, parse_duration


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("01:30:00", 5400),
        ("0:00:30", 30),
        ("1-02:03:04", 93784),
        ("90s", 90),
        ("45m", 2700),
        ("1.5h", 5400),
        ("2d", 172800),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["3600", "1:30", "an hour", "-1h", "1:2:3:4"])
def test_parse_duration_refuses_ambiguous_or_malformed(text):
    with pytest.raises(ValueError, match="HH:MM:SS"):
        parse_duration(text)


def test_max_time_is_checked_at_compose_time():
    from hydra import compose, initialize_config_dir

    from trainer.cli import register, to_config

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        assert to_config(compose(config_name="config", overrides=["trainer.max_time=02:00:00"])).trainer.max_time
        with pytest.raises(SystemExit, match="trainer.max_time: '7200' is not a duration"):
            to_config(compose(config_name="config", overrides=["trainer.max_time=7200"]))


def test_out_of_time_looks_one_step_ahead():
    assert not out_of_time(90, 8, 100)  # the next step would end at 98 s
    assert out_of_time(93, 8, 100)  # ... at 101 s: stop now
    assert not out_of_time(10**6, 10**6, None)


def test_longest_step_is_measured_between_checks():
    now = [0.0]
    p = Preemption(max_time_s=100, clock=lambda: now[0])
    for t, expected in [
        (20, [0, 0, 0]),  # first check: no step measured yet
        (30, [0, 0, 0]),  # a 10 s step; 30 + 10 <= 100
        (60, [0, 0, 0]),  # a 30 s step; 60 + 30 <= 100
        (75, [0, 0, 1]),
    ]:  # 75 + 30 > 100: the next step could cross the budget
        now[0] = t
        assert p.local_flags() == expected, t
    assert p.longest_step_s == 30


def test_decide_never_turns_a_cancellation_into_a_requeue():
    assert decide([0, 0, 0]) is None
    assert decide([0, 2, 0]) == USR1
    assert decide([1, 1, 1]) == TERM
    assert decide([0, 0, 2]) == MAX_TIME


@pytest.fixture
def handlers(monkeypatch):
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)}
    monkeypatch.setattr(preemption, "_ACTIVE", None)  # a fresh process, as far as install() knows
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.mark.parametrize("signum, reason", [(signal.SIGUSR1, USR1), (signal.SIGUSR2, USR1), (signal.SIGTERM, TERM)])
def test_a_signal_only_raises_a_flag(handlers, signum, reason):
    p = preemption.install(None)
    os.kill(os.getpid(), signum)
    assert p.signalled == reason
    flags = p.local_flags()
    assert flags[reason] == 1 and sum(flags) == 1


def test_one_clock_per_process_across_recipe_stages(handlers):
    first = preemption.install("1h")
    first.started -= 1000  # the first stage ran for 1000 s
    os.kill(os.getpid(), signal.SIGUSR1)  # a notice between two stages
    second = preemption.install("20m")
    assert second is first and second.max_time_s == 1200 and second.signalled == USR1
    assert second.local_flags() == [0, 1, 0]
    second.signalled = None
    second.started -= 300
    assert second.local_flags()[MAX_TIME] == 1  # 1300 s of the job's 1200 s budget are gone


def test_a_second_signal_ends_the_process():
    """Asked twice, stop being graceful: the second USR1 takes its default action."""
    code = (
        "import os, signal, time\nfrom trainer.checkpointing import preemption\np = preemption.install(None)\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\nassert p.signalled is not None\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\ntime.sleep(5)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGUSR1, proc.stderr
