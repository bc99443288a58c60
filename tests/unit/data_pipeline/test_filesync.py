"""The file-sync primitives (data_pipeline/filesync.py) on literal files: the owner-recorded lock, a
file's age, the heartbeat and its watch, the polling wait. No sleep longer than a few tenths of a
second."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from data_pipeline import filesync


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # reaped: the pid names no process now
    return pid


def test_a_lock_is_taken_once_records_its_owner_and_is_free_again_once_released(tmp_path):
    lock = tmp_path / "cache" / "key.lock"  # its folder is made on the way
    assert filesync.take_lock(lock)
    owner = json.loads(lock.read_text())
    assert owner["host"] == socket.gethostname() and owner["pid"] == os.getpid()
    assert abs(owner["since"] - time.time()) < 60
    assert not filesync.take_lock(lock)  # held by a live process (this one): refused
    assert not filesync.lock_is_stale(lock)
    filesync.release_lock(lock)
    assert not lock.exists()
    filesync.release_lock(lock)  # releasing twice is no error
    assert filesync.take_lock(lock)


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over(tmp_path):
    lock = tmp_path / "key.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "since": 0}))
    assert filesync.lock_is_stale(lock)
    assert filesync.take_lock(lock)
    assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_a_lock_of_another_host_or_being_written_is_never_stale(tmp_path):
    lock = tmp_path / "key.lock"
    lock.write_text(json.dumps({"host": "elsewhere", "pid": _dead_pid(), "since": 0}))
    assert not filesync.lock_is_stale(lock)  # its process cannot be checked from here
    assert not filesync.take_lock(lock)
    lock.write_text("")  # created, not yet written by its owner
    assert not filesync.lock_is_stale(lock)
    assert not filesync.lock_is_stale(tmp_path / "missing.lock")


def test_a_files_age_is_counted_from_its_modification_time(tmp_path):
    path = tmp_path / "lock"
    path.write_text("")
    os.utime(path, (1000.0, 1000.0))
    assert filesync.age_s(path, now=1600.0) == 600.0
    assert 0 < filesync.age_s(path) < time.time()
    assert filesync.age_s(tmp_path / "missing") is None


def test_a_heartbeat_advances_while_the_block_runs_and_stops_after_it(tmp_path):
    path = tmp_path / "HEARTBEAT.0"
    before = time.time()
    with filesync.heartbeat(path, every_s=0.05):
        filesync.wait_until(lambda: path.exists(), poll_s=0.01, timeout_s=5)
        first = filesync.last_beat(path)
        filesync.wait_until(lambda: filesync.last_beat(path) > first, poll_s=0.01, timeout_s=5)
    assert before <= first < filesync.last_beat(path) <= time.time()
    last = filesync.last_beat(path)
    time.sleep(0.15)  # three periods: a thread still running would have beaten
    assert filesync.last_beat(path) == last
    path.write_text("")  # truncated, not yet written
    assert filesync.last_beat(path) is None and filesync.last_beat(tmp_path / "missing") is None


def test_a_heartbeat_watch_names_the_silent_files_after_the_grace(tmp_path):
    fresh, silent, future = (tmp_path / f"HEARTBEAT.{r}" for r in range(3))
    watch = filesync.HeartbeatWatch([fresh, silent, future])
    silent.write_text(str(time.time() - 3600))  # beat an hour ago: before the watch began
    future.write_text(str(time.time() + 3600))  # another host's clock ahead of ours: counts as now
    assert watch.stalled(after_s=0.1) == []  # every file gets the grace from when the watch began
    time.sleep(0.2)
    fresh.write_text(str(time.time()))
    future.write_text(str(time.time() + 3600))
    assert watch.stalled(after_s=0.1) == [silent]


def test_wait_until_returns_once_ready_and_polls_in_between():
    polls = []
    checked = []
    filesync.wait_until(lambda: polls.append(1) or len(polls) >= 3, poll_s=0.01, check=lambda: checked.append(1))
    assert len(polls) == 3 and len(checked) == 2  # checked between polls, not once ready


def test_wait_until_ends_with_the_checks_error():
    def peer_failed() -> None:
        raise RuntimeError("rank 1 failed")

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 failed"):
        filesync.wait_until(lambda: False, poll_s=10.0, check=peer_failed)
    assert time.monotonic() - started < 1  # at the first poll, not after a sleep


def test_wait_until_raises_at_its_deadline():
    started = time.monotonic()
    with pytest.raises(ValueError, match="still being prepared"):
        filesync.wait_until(
            lambda: False, poll_s=0.02, timeout_s=0.1, timeout_error=lambda: ValueError("still being prepared")
        )
    assert 0.1 <= time.monotonic() - started < 1
    with pytest.raises(TimeoutError, match="not ready after 0 s"):
        filesync.wait_until(lambda: False, poll_s=0.02, timeout_s=0.05)
