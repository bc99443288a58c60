# Shared by slurm/full_ft.sh and slurm/cpt.sh (sourced, never submitted): the job's environment,
# the rendezvous, signal forwarding and the launch. The templates hold only #SBATCH lines and the
# choice of stage; hyperparameters live in conf/.
#
# Knobs (environment variables; sbatch exports the submitting shell's environment to the job):
#   EXP=medical            experiment (+exp=...); empty = the embedded default config
#   OUTPUT_DIR=DIR         adds output_dir=DIR (else the config's outputs/<exp_name>, which a
#                          requeued or resubmitted job finds again and resumes from)
#   NPROC_PER_NODE=N       processes per node (default: the GPUs Slurm gave the job on the node)
#   LAUNCHER=torchrun|srun torchrun: one torchrun per node, c10d rendezvous (default);
#                          srun: one srun task per process, rank from SLURM_PROCID
#   VENV=DIR               a virtualenv to activate (default: <repo>/.venv when it exists)
#   FULLFT_SETUP=FILE      a file to source first (module load ..., conda activate ...)
#   NCCL_*, TORCH_NCCL_*   anything set wins over the defaults below
# Extra arguments to sbatch after the script name are Hydra overrides:
#   sbatch slurm/full_ft.sh trainer.optim.lr=1e-5 trainer.max_steps=2000

fullft_log() { echo "[$(date +%H:%M:%S) slurm/${SLURM_JOB_NAME:-fullft} job ${SLURM_JOB_ID:-?}] $*"; }

# The overrides as they may be logged: secret-looking values hidden, by the trainer's own rule
# (trainer/config.py's redact_args, also what W&B records).
# Run from $FULLFT_ROOT with the job's Python (fullft_launch's working directory and PATH).
_fullft_redacted() { python -m trainer.observability.redaction redact-args "$@"; }

# Signals arriving while srun runs: the batch shell (the only process `--signal=B:USR1@T` reaches)
# passes USR1 on to every process of the job's steps, on every node. torchrun agents ignore it
# (see fullft_launch); each rank catches it, all ranks agree to stop at the same step, save, and
# rank 0 requeues the job (trainer/checkpointing/preemption.py).
_fullft_on_usr1() {
    if [[ -n ${_FULLFT_USR1_SENT:-} ]]; then return; fi
    _FULLFT_USR1_SENT=1
    fullft_log "got USR1 (walltime/preemption notice): asking every rank to save a checkpoint, then requeue"
    scancel --signal=USR1 "$SLURM_JOB_ID" || fullft_log "scancel --signal=USR1 failed"
}
_fullft_on_term() {
    # scancel, preemption, or the requeue rank 0 asked for: Slurm has sent TERM to every rank too;
    # they save and exit if they can before KillWait runs out. No requeue from here (Slurm requeues a
    # preempted job by itself; a cancelled job stays cancelled).
    _FULLFT_GOT_TERM=1
    fullft_log "got TERM (cancelled, preempted or requeued): ranks save a checkpoint at the current step if time allows"
}

_fullft_store() {  # a c10d TCPStore server on this node, at $MASTER_PORT, until srun is over
    trap '' TERM  # a cancel or requeue TERMs the whole job: the ranks still need the store to stop cleanly
    exec python -c 'import datetime, os, signal
from torch.distributed import TCPStore
store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=True, multi_tenant=True,
                 wait_for_workers=False, timeout=datetime.timedelta(hours=1))
signal.pause()'
}

fullft_setup() {
    if [[ -z ${SLURM_JOB_ID:-} ]]; then
        echo "not inside a Slurm job: submit with sbatch (or run inside salloc)" >&2
        exit 2
    fi
    cd "$FULLFT_ROOT" || { echo "cannot cd to $FULLFT_ROOT" >&2; exit 1; }
    if [[ -n ${FULLFT_SETUP:-} ]]; then
        # shellcheck disable=SC1090
        source "$FULLFT_SETUP"
    fi
    local venv=${VENV:-$FULLFT_ROOT/.venv}
    if [[ -f $venv/bin/activate ]]; then
        # shellcheck disable=SC1091
        source "$venv/bin/activate"
    fi
    command -v torchrun >/dev/null || { echo "torchrun not on PATH: set VENV or FULLFT_SETUP" >&2; exit 1; }

    # Collectives: a failed or timed-out NCCL operation aborts the process instead of hanging
    # (its peers then fail too, and srun --kill-on-bad-exit ends the job). The collective timeout
    # itself is trainer.failure.dist_timeout_s.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-$TORCH_NCCL_ASYNC_ERROR_HANDLING}  # older torch
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # Logs reach the job's file as they happen; a hard crash prints every thread's Python stack.
    export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
    # Models and tokenizers come from local directories, never the Hub, at run time.
    export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

    local nodes
    nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
    if [[ -z ${MASTER_ADDR:-} ]]; then
        MASTER_ADDR=$(head -n1 <<< "$nodes")
        if ! getent hosts "$MASTER_ADDR" >/dev/null; then  # a node name DNS does not know: its NodeAddr
            MASTER_ADDR=$(scontrol show node "$MASTER_ADDR" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
        fi
    fi
    export MASTER_ADDR
    # Derived from the job id alike on every node (no ssh, no shared file); the restart count moves
    # it on after a requeue, so a socket of the previous attempt cannot be in the way.
    export MASTER_PORT=${MASTER_PORT:-$((20000 + (SLURM_JOB_ID * 10 + ${SLURM_RESTART_COUNT:-0}) % 20000))}
    FULLFT_NNODES=${SLURM_JOB_NUM_NODES:-1}
    if [[ -z ${NPROC_PER_NODE:-} ]]; then
        NPROC_PER_NODE=${SLURM_GPUS_ON_NODE:-}
        if [[ -z $NPROC_PER_NODE || $NPROC_PER_NODE == 0 ]]; then
            NPROC_PER_NODE=1
            fullft_log "no GPUs allocated on the node: 1 process per node (set NPROC_PER_NODE for more CPU ranks)"
        fi
    fi
    FULLFT_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( FULLFT_CPUS_PER_TASK / NPROC_PER_NODE > 0 ? FULLFT_CPUS_PER_TASK / NPROC_PER_NODE : 1 ))}
    LAUNCHER=${LAUNCHER:-torchrun}
}

# fullft_launch OVERRIDE...: start training on every node of the allocation and wait for it.
# Exits the batch script with srun's exit code.
fullft_launch() {
    local attempt=$(( ${SLURM_RESTART_COUNT:-0} + 1 ))
    fullft_log "attempt $attempt on $FULLFT_NNODES node(s) [$SLURM_JOB_NODELIST] x $NPROC_PER_NODE process(es)," \
               "rendezvous $MASTER_ADDR:$MASTER_PORT, launcher $LAUNCHER, in $FULLFT_ROOT"
    fullft_log "overrides: $(_fullft_redacted "$@")"

    # Each srun task starts with USR1 and TERM ignored; the ranks install their own handlers
    # (trainer/checkpointing/preemption.py) and inherit "ignored" until then, so an early signal is not fatal.
    # torchrun must not act on TERM either: by default it forwards TERM and kills its workers
    # 30 s later, mid-save; --signals-to-handle (torch >= 2.6) leaves TERM to the ranks and KillWait.
    local srun_args=(--kill-on-bad-exit=1 --nodes="$FULLFT_NNODES" --export=ALL)
    if (( FULLFT_NNODES > 1 )); then srun_args+=(--label); fi
    local inner
    case $LAUNCHER in
        torchrun)
            srun_args+=(--ntasks="$FULLFT_NNODES" --ntasks-per-node=1 --cpus-per-task="$FULLFT_CPUS_PER_TASK")
            local flags=""
            if torchrun --help 2>/dev/null | grep -q -- --signals-to-handle; then
                flags="--signals-to-handle=SIGINT,SIGHUP,SIGQUIT"
            fi
            if (( FULLFT_NNODES > 1 )); then
                # The c10d rendezvous store must outlive every node's torchrun: hosted by the
                # first node's torchrun, it goes away when that one exits while the others still
                # use it (a RendezvousConnectionError trace at the end of a good run). The batch
                # shell runs on the first node; it hosts the store until srun is over.
                _fullft_store &
                FULLFT_STORE_PID=$!
                flags+=" --rdzv-conf=is_host=false"
            fi
            # c10d rendezvous at $MASTER_ADDR:$MASTER_PORT; the id changes per attempt.
            inner='trap "" USR1 TERM; exec torchrun '"$flags"' --nnodes="$SLURM_JOB_NUM_NODES" \
                   --nproc-per-node="$NPROC_PER_NODE" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
                   --rdzv-id="$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}" --max-restarts=0 launch/train.py "$@"'
            ;;
        srun)
            local per_task=$(( FULLFT_CPUS_PER_TASK / NPROC_PER_NODE > 0 ? FULLFT_CPUS_PER_TASK / NPROC_PER_NODE : 1 ))
            srun_args+=(--ntasks=$(( FULLFT_NNODES * NPROC_PER_NODE )) --ntasks-per-node="$NPROC_PER_NODE"
                        --cpus-per-task="$per_task")
            inner='trap "" USR1 TERM; exec python launch/train.py "$@"'
            ;;
        *) fullft_log "LAUNCHER=$LAUNCHER: use torchrun or srun"; exit 2 ;;
    esac
    export NPROC_PER_NODE

    trap _fullft_on_usr1 USR1
    trap _fullft_on_term TERM
    srun "${srun_args[@]}" bash -c "$inner" fullft "$@" &
    local pid=$! rc=0
    while :; do
        wait "$pid" && rc=0 || rc=$?
        kill -0 "$pid" 2>/dev/null || break  # still running: a trapped signal interrupted `wait`
    done
    trap - USR1 TERM
    if [[ -n ${FULLFT_STORE_PID:-} ]]; then kill -KILL "$FULLFT_STORE_PID" 2>/dev/null; fi
    if (( rc == 0 )); then
        fullft_log "training processes exited cleanly (finished, or stopped early: see STOPPED EARLY above)"
    elif [[ -n ${_FULLFT_GOT_TERM:-} ]]; then
        fullft_log "srun exited with code $rc after TERM (the job was cancelled, preempted or requeued)"
    elif [[ $LAUNCHER == torchrun ]]; then
        fullft_log "FAILED: srun exited with code $rc. The first rank to fail, and why (exit code or signal)," \
                   "is in torchrun's 'Root Cause' block above; the first 'srun: error: NODE: task N' names its node."
    else
        fullft_log "FAILED: srun exited with code $rc. The first 'srun: error: NODE: task N: ...' line above" \
                   "names the rank that failed first (task N = rank N) and why."
    fi
    exit "$rc"
}
