"""Run a function on N ranks of a real process group, from inside a test, in a few seconds.

`run_distributed(fn, 2, out_dir)` starts two processes, joins them into one gloo group through the
trainer's own `trainer.distributed.init` (DeepSpeed's comm backend, its /dev/shm buffers released
as in training), runs `fn(rank, world_size, out_dir)` on each and returns their return values in
rank order. The distributed tests use it for the checkpointer, the all-reduces and EWC's shards,
which need two ranks but not a whole training run (a subprocess launch of launch/train.py costs
~20-40 s on two cores). Here, on a busy 2-core machine: the first call of a test session ~10-20 s
(the forkserver's imports), each later one ~1 s to start its ranks plus ~1.5-3 s per ZeRO-3 engine
that `fn` builds.

How it stays cheap and safe:
- Processes come from a forkserver that has imported torch, deepspeed and transformers once per
  test session, so each rank is a fork of an interpreter with those imports done and no threads
  started. Plain `fork` of the pytest process is unsafe (it may already run OpenMP threads);
  `spawn` would pay the imports (~10 s) again for every rank of every test.
- Every rank runs one torch thread (OMP_NUM_THREADS=1, which `init` honours, and set again after
  it), so a result does not depend on the core count and two ranks never oversubscribe the cores.
- Each rank's stdout and stderr go to a file of its own (a forkserver's children would otherwise
  all write to the streams of the test that started the server); the tails come back in the failure
  message. faulthandler is on, so a crash leaves a Python stack there too.
- An exception in a rank fails the call at once with that rank's traceback. A rank that dies
  without one (a signal, os._exit) fails it with its exit code. A rank still running when another
  failed, or when a time limit runs out (startup, then `timeout_s` for the work), gets SIGABRT
  (faulthandler prints its stack, then it ends) and SIGKILL if that does not end it; its stack is
  in the message. No rank outlives the call: each is a process group of its own, killed whole (a
  compiler it started included), and one whose pytest is killed outright dies with the forkserver
  (PR_SET_PDEATHSIG).
- DeepSpeed's /dev/shm all-reduce buffers of the group must be gone when the ranks end (the trainer
  unlinks them in init): a clean call that leaves one fails, and the files are removed either way.

`fn` and its arguments go to the ranks by pickle: `fn` must be a module-level function of an
importable module (a test module is: pytest put its directory on sys.path), and it must return
something picklable (tensors are fine). Ranks inherit the environment of the forkserver, not the
test's current one: pass variables with `env=` (monkeypatch.setenv in the test does not reach them).
"""

from __future__ import annotations

import errno
import faulthandler
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import resource
import signal
import socket
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

# What the forkserver imports once for every rank it will fork. Only third-party modules: a
# project module that failed to import here (the trainer being edited) would kill the server.
# DeepSpeed's Muon module is imported by deepspeed.initialize's optimizer check and calls
# torch.compile at import, which pulls in torch._inductor: ~8 s of every rank's first engine here.
_PRELOAD = [
    "torch",
    "deepspeed",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "deepspeed.runtime.zero.muon.muon_optimizer",
]
# Until every rank has joined the group: the forkserver's imports (first call of a session) and,
# when DeepSpeed's shm op is not in the torch extensions cache, its JIT build (~2-4 min on a busy
# 2-core machine). Generous, and apart from timeout_s, so a slow start never reads as a hang of fn.
_STARTUP_TIMEOUT_S = 900.0
# A rank asked to show its stack (faulthandler) and end gets this long before SIGKILL.
_ABORT_GRACE_S = 10.0
_LOG_TAIL_CHARS = 6000
_PORT_ATTEMPTS = 3


class DistributedFailure(AssertionError):
    """One or more ranks failed. `exitcodes[rank]`: the rank's exit code (negative: the signal that
    ended it; None: still running at the end, then killed); `errors[rank]`: the traceback of an
    exception the rank raised itself. The message has every rank's story and the tail of its log."""

    def __init__(self, message: str, exitcodes: Dict[int, Optional[int]], errors: Dict[int, str]) -> None:
        super().__init__(message)
        self.exitcodes = exitcodes
        self.errors = errors


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    *args: Any,
    timeout_s: float = 600,
    env: Optional[Dict[str, str]] = None,
) -> List[Any]:
    """`fn(rank, world_size, *args)` on `world_size` ranks of one gloo process group; the ranks'
    return values in rank order. timeout_s bounds the ranks' work once all of them have joined the
    group (startup has its own bound, _STARTUP_TIMEOUT_S) and is the group's collective timeout. It
    only matters when something hangs: keep it generous, a tiny engine's seconds of work can take
    minutes on a machine busy with other jobs. env: extra environment variables for every rank."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # no effect once the server runs (it already has them)
    with tempfile.TemporaryDirectory(prefix="inprocess-ranks-") as logs:
        for attempt in range(_PORT_ATTEMPTS):
            port = _free_port()
            try:
                outcome = _run_once(ctx, fn, world_size, args, timeout_s, env or {}, port, Path(logs))
            finally:
                leaked = _remove_shm_buffers(port)
            if outcome == "port_taken" and attempt + 1 < _PORT_ATTEMPTS:
                continue  # another process took the free port before rank 0 bound it: a new port
            if outcome == "port_taken":
                raise DistributedFailure(f"rank 0 found MASTER_PORT taken {_PORT_ATTEMPTS} times", {}, {})
            if leaked:
                raise AssertionError(
                    f"DeepSpeed shm all-reduce buffers outlived the ranks (removed now): {leaked}; "
                    "trainer.distributed.ops.release_shm_buffer no longer unlinks them"
                )
            return outcome
    raise AssertionError("unreachable")


# ---- the parent ------------------------------------------------------------------------------------


def _run_once(ctx, fn, world_size: int, args, timeout_s: float, env: Dict[str, str], port: int, logs: Path):
    """Start the ranks, collect their answers; the results, "port_taken", or DistributedFailure."""
    deadline = time.monotonic() + _STARTUP_TIMEOUT_S  # until every rank is in the group, then timeout_s
    # Pickled here, unpickled in the rank once its output goes to its log: a test module that fails
    # to import there (or an argument that cannot be pickled here) is reported, not lost.
    work = pickle.dumps((fn, args))
    procs, conns, log_paths = [], [], []
    try:
        for rank in range(world_size):
            log_path = logs / f"port{port}_rank{rank}.log"
            receive, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_rank_main,
                name=f"rank{rank}",
                daemon=True,
                args=(rank, world_size, port, timeout_s, env, str(log_path), send, work),
            )
            proc.start()
            send.close()  # only the child holds the write end: its death reads as EOF here
            procs.append(proc)
            conns.append(receive)
            log_paths.append(log_path)
        results: Dict[int, Any] = {}
        errors: Dict[int, str] = {}
        died: Dict[int, int] = {}
        joined = set()
        port_taken = False
        while len(results) < world_size and not errors and not died:
            waiting = [conns[r] for r in range(world_size) if r not in results]
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not multiprocessing.connection.wait(waiting, timeout=remaining):
                break
            for rank in range(world_size):
                if rank in results or not conns[rank].poll():
                    continue
                try:
                    kind, payload = pickle.loads(conns[rank].recv_bytes())
                except EOFError:  # ended without a word: a signal, os._exit, a crash in C
                    procs[rank].join()
                    died[rank] = procs[rank].exitcode
                    continue
                if kind == "joined":
                    joined.add(rank)
                    if len(joined) == world_size:
                        deadline = time.monotonic() + timeout_s
                elif kind == "ok":
                    results[rank] = payload
                else:
                    errors[rank] = payload
                    port_taken |= kind == "port_taken"
        if len(results) == world_size:
            for proc in procs:
                proc.join(max(1.0, deadline - time.monotonic()))
            _forward_logs(log_paths)
            return [results[r] for r in range(world_size)]
        timed_out = not errors and not died
        stopped = _stop(procs, answered=set(results) | set(errors))
        if port_taken:
            return "port_taken"
        raise _failure(world_size, timeout_s, timed_out, joined, results, errors, died, stopped, procs, log_paths)
    finally:
        for proc in procs:  # whatever happened above (KeyboardInterrupt included), nothing survives
            _kill_group(proc)
            proc.join()
        for conn in conns:
            conn.close()


def _stop(procs, answered) -> List[int]:
    """End every rank: one that answered is on its way out (os._exit right after its answer);
    every other live one gets SIGABRT (faulthandler writes its stack to its log, then it dies).
    SIGKILL for any that outlasts the grace period. The ranks stopped without an answer."""
    end = time.monotonic() + _ABORT_GRACE_S
    for r in answered:
        procs[r].join(max(0.0, end - time.monotonic()))
    live = [r for r, p in enumerate(procs) if p.is_alive() and r not in answered]
    for r in live:
        try:
            os.kill(procs[r].pid, signal.SIGABRT)
        except ProcessLookupError:
            pass
    end = time.monotonic() + _ABORT_GRACE_S
    for r in live:
        procs[r].join(max(0.0, end - time.monotonic()))
        _kill_group(procs[r])
        procs[r].join()
    return live


def _kill_group(proc) -> None:
    """SIGKILL a rank and whatever it started (its process group: e.g. the compiler of a JIT build)."""
    if proc.pid is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _failure(
    world_size, timeout_s, timed_out, joined, results, errors, died, stopped, procs, log_paths
) -> DistributedFailure:
    if timed_out and len(joined) < world_size:
        head = (
            f"ranks {sorted(set(range(world_size)) - joined)} did not join the process group within "
            f"{_STARTUP_TIMEOUT_S:g} s; the stacks are below"
        )
    elif timed_out:
        head = f"ranks {stopped} did not finish within timeout_s={timeout_s:g} s (a hang?); their stacks are below"
    else:
        head = "; ".join(
            [f"rank {r} raised" for r in sorted(errors)]
            + [f"rank {r} died with exit code {c}{_signal_name(c)}" for r, c in sorted(died.items())]
        )
    parts = [head]
    for r in range(world_size):
        if r in errors:
            story = f"raised:\n{errors[r]}"
        elif r in died:
            story = f"ended without a result, exit code {died[r]}{_signal_name(died[r])}"
        elif r in results:
            story = "finished"
        else:
            story = "was still running and was stopped (SIGABRT: its stack is in its log)"
        parts.append(f"---- rank {r} {story}\n---- rank {r} log (tail):\n{_tail(log_paths[r])}")
    if any("_run_ninja_build" in _tail(p) for p in log_paths):
        parts.append(
            "A rank was stopped inside a JIT build of a DeepSpeed op (see its stack): that build's `lock` "
            "file under TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions/py*_cpu/<op>/) outlives it, "
            "and every later load of the op waits for it forever. Delete it once no build is running; "
            "raise timeout_s if the build needs longer on this machine."
        )
    exitcodes = {r: (died[r] if r in died else None if r in stopped else procs[r].exitcode) for r in range(world_size)}
    return DistributedFailure("\n".join(parts), exitcodes, errors)


def _signal_name(code: Optional[int]) -> str:
    if code is None or code >= 0:
        return ""
    try:
        return f" ({signal.Signals(-code).name})"
    except ValueError:
        return ""


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text if len(text) <= _LOG_TAIL_CHARS else "..." + text[-_LOG_TAIL_CHARS:]


def _forward_logs(log_paths: List[Path]) -> None:
    """The ranks' output into the test's own stdout (pytest shows it when the test fails)."""
    for rank, path in enumerate(log_paths):
        text = _tail(path)
        if text.strip():
            print(f"---- rank {rank} log (tail)\n{text}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _remove_shm_buffers(port: int) -> List[str]:
    """DeepSpeed's CPU all-reduce buffers of this group (named by MASTER_ADDR and MASTER_PORT) that are
    still in /dev/shm: removed, and named. After a clean run there are none (trainer.distributed
    unlinks them in init); after ranks were killed during init there can be."""
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*"))
    for path in left:
        path.unlink(missing_ok=True)
    return [p.name for p in left]


# ---- a rank ----------------------------------------------------------------------------------------


def _rank_main(
    rank: int, world_size: int, port: int, timeout_s: float, env: Dict[str, str], log_path: str, conn, work: bytes
) -> None:
    """The body of one rank (in a process forked from the forkserver)."""
    os.setsid()  # a process group of its own, so the parent can end it with everything it started
    _die_with_the_forkserver()
    _own_output(log_path)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGABRT must not drop a core file in the repo
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",  # trainer.distributed.init honours it: one intra-op thread per rank
            # The venv's ninja, as under `make test`: DeepSpeed JIT-builds its shm op with whichever ninja
            # is first on PATH, and the system one (an older build-log format) would rebuild it (~2-3 min).
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            **env,
        }
    )
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s %(message)s", force=True
    )
    # DeepSpeed calls collectives torch has renamed: the warning repeats at every call (as in the trainer's logs).
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use .*", category=FutureWarning)
    import torch

    from trainer import distributed

    torch.set_num_threads(1)
    try:
        distributed.init(int(timeout_s))
    except BaseException as ex:  # noqa: BLE001 - every failure goes back to the parent
        text = traceback.format_exc()
        kind = "port_taken" if rank == 0 and _is_addr_in_use(ex, text) else "error"
        _answer(conn, kind, text)
    conn.send_bytes(pickle.dumps(("joined", None)))
    # Again after init, whatever it chose: one thread makes results independent of the machine's
    # core count and keeps two ranks from oversubscribing two cores.
    torch.set_num_threads(1)
    try:
        fn, args = pickle.loads(work)
        value = fn(rank, world_size, *args)
        distributed.shutdown()  # a barrier: every rank finished fn
    except BaseException:  # noqa: BLE001
        _answer(conn, "error", traceback.format_exc())
    _answer(conn, "ok", value)


def _die_with_the_forkserver() -> None:
    """A rank is the forkserver's child, not the test process's. If pytest itself is killed, the
    forkserver exits (its "alive" pipe from pytest reads EOF) and the kernel then SIGKILLs the ranks
    (PR_SET_PDEATHSIG), instead of leaving them waiting in a collective. multiprocessing hands every
    child a copy of that pipe's write end, which would keep the server alive as long as the ranks:
    the rank closes it (a forkserver the rank itself might need is then started afresh)."""
    import ctypes
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    if getattr(server, "_forkserver_alive_fd", None) is not None:
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() == 1:  # the forkserver was already gone before the call above
        os._exit(1)


def _own_output(log_path: str) -> None:
    """stdout and stderr (file descriptors 1 and 2, so C++ and faulthandler output too) into the log."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    faulthandler.enable(file=sys.stderr, all_threads=True)


def _is_addr_in_use(ex: BaseException, text: str) -> bool:
    return (
        (isinstance(ex, OSError) and ex.errno == errno.EADDRINUSE)
        or "EADDRINUSE" in text
        or "address already in use" in text.lower()
    )


def _answer(conn, kind: str, payload) -> None:
    """Send the answer and end the process at once: atexit hooks and a gloo group's destructor can
    block on a peer that is gone; the pipe and the log are all the parent needs."""
    code = 0 if kind == "ok" else 1
    try:
        data = pickle.dumps((kind, payload))  # plain pickle: tensors by value, not by shared memory
    except Exception:  # noqa: BLE001 - an unpicklable result is the test's mistake: say so
        data, code = pickle.dumps(("error", f"rank result is not picklable:\n{traceback.format_exc()}")), 1
    if kind != "ok":
        sys.stderr.write(str(payload))
    conn.send_bytes(data)
    conn.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
