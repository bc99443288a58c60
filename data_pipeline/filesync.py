"""Processes that coordinate through files instead of collectives: an owner-recorded lock file, a
file's age, a heartbeat file and its watcher, and a polling wait. A collective times out (NCCL/gloo,
minutes) while the work it waits for (tokenizing a corpus, converting a checkpoint) can take hours,
and a file also outlives the process that wrote it, so a survivor can tell a dead owner from a slow
one. Users: data_pipeline/prepare.py (one preparer per node, the other ranks wait for its
manifest), trainer/checkpointing/reshard.py (the ranks of a universal conversion), and
trainer/distributed/ops.py (DeepSpeed's build lock).

A leaf module (it imports nothing of the project), in data_pipeline/ because that is the lower
layer: the trainer may import it, the data pipeline may never import the trainer.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

# ---- an owner-recorded lock file --------------------------------------------------------------------


def take_lock(path: Path) -> bool:
    """Create the lock file `path` if no one holds it, recording its owner ({host, pid, since}), and
    say whether this process now holds it. A lock whose owner died on this host is taken over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):  # at most one take-over: a second stale lock means another process raced us
        try:
            # O_EXCL: creating the file is the test-and-set, atomic on a local and an NFSv3+ filesystem
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if not lock_is_stale(path):
                return False
            path.unlink(missing_ok=True)  # its owner died on this host; take over
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}, f)
        return True
    return False


def lock_is_stale(path: Path) -> bool:
    """Whether the lock file `path` was left by a process of this host that no longer runs. Never
    for another host's lock (its processes cannot be checked from here) or one being written."""
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return False  # gone, or created and not yet written: its owner is alive
    if owner.get("host") != socket.gethostname():
        return False  # cannot check another host's process
    try:
        os.kill(int(owner["pid"]), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # it exists, as another user's process
    return False


def release_lock(path: Path) -> None:
    """Remove the lock file `path` (taken with `take_lock`); a missing one is not an error."""
    path.unlink(missing_ok=True)


def age_s(path: Path, now: Optional[float] = None) -> Optional[float]:
    """Seconds since `path` was last modified (at wall-clock time `now`, default the present), or
    None when it does not exist. For lock files that record no owner, such as DeepSpeed's."""
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return None
    return (time.time() if now is None else now) - mtime


# ---- heartbeats -------------------------------------------------------------------------------------


@contextlib.contextmanager
def heartbeat(path: Path, every_s: float) -> Iterator[None]:
    """While the block runs, a daemon thread writes the wall-clock time (time.time()) into `path`
    every `every_s` seconds, so processes that wait on this one (`HeartbeatWatch`) can tell a long
    call that cannot report progress (a library's conversion) from a dead process."""
    stop = threading.Event()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")

    def beat() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):  # a full or flaky disk must not kill the work it watches
                tmp.write_text(str(time.time()))
                os.replace(tmp, path)  # atomic: a reader sees the previous beat or this one, never half of one
            stop.wait(every_s)

    thread = threading.Thread(target=beat, name=f"heartbeat {path.name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def last_beat(path: Path) -> Optional[float]:
    """The wall-clock time a `heartbeat` last wrote into `path`, or None when it has written none
    (no file yet, or an unreadable one)."""
    try:
        return float(path.read_text())
    except (OSError, ValueError):
        return None


class HeartbeatWatch:
    """How long each of some heartbeat files has been silent, counted from when the watch began for
    one that has not beaten since: a process gets the full grace to start beating."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self._heard: Dict[Path, float] = {p: time.monotonic() for p in paths}  # monotonic time of the last beat

    def stalled(self, after_s: float) -> List[Path]:
        """The files (in the order given) whose last beat is more than `after_s` seconds old."""
        now = time.monotonic()
        for path in self._heard:
            beat = last_beat(path)
            if beat is not None:
                # The beat is the writer's wall clock; carried onto this process's monotonic clock,
                # and a beat from the future (another host's clock ahead of ours) counts as now.
                self._heard[path] = max(self._heard[path], now - max(0.0, time.time() - beat))
        return [p for p, heard in self._heard.items() if now - heard > after_s]


# ---- waiting ----------------------------------------------------------------------------------------


def wait_until(
    ready: Callable[[], bool],
    poll_s: float,
    check: Optional[Callable[[], None]] = None,
    timeout_s: Optional[float] = None,
    timeout_error: Optional[Callable[[], BaseException]] = None,
) -> None:
    """Poll `ready()` every `poll_s` seconds until it is true. Between polls `check()` runs and
    raises to end the wait on a failure it sees (a failed or silent peer); after `timeout_s`
    seconds (None: no limit) the wait raises `timeout_error()`, or a TimeoutError."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not ready():
        if check is not None:
            check()
        if deadline is not None and time.monotonic() > deadline:
            if timeout_error is not None:
                raise timeout_error()
            raise TimeoutError(f"not ready after {timeout_s:.0f} s")
        time.sleep(poll_s)
