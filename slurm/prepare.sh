#!/bin/bash
# Prepare a big corpus on many nodes: a Slurm array of tokenizing tasks, then one dependent job
# (afterok) that packs their units into rows and writes the manifests; training then maps the result.
#
#   mkdir -p logs && TASKS=8 bash slurm/prepare.sh data.path=/shared/pubmed/    # submits both, prints ids
#   sbatch --dependency=afterok:<merge id> slurm/cpt.sh data.path=/shared/pubmed/
#
# Each array task runs `launch/prepare_data.py --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`
# on every core of its node (data.prepare_workers): the units of every source whose index is its own
# modulo the task count (data_pipeline/prepare.py), each written whole into the cache, so a failed or
# preempted task reruns alone (`scontrol requeue <job>_<task>`, or the same command again) and keeps
# the finished units. The merge is `launch/prepare_data.py` without --shard: it finds every unit
# tokenized, concatenates them in order and packs: the rows are byte-identical to one process's.
# data.cache_dir must be a filesystem every node sees. Knobs: EXP (as slurm/common.sh; empty = the
# embedded default config), TASKS (4), VENV, FULLFT_SETUP; extra arguments are Hydra overrides, the
# same for the tasks, the merge and the training job.
#SBATCH --job-name=prepare
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%A_%a.out

# The role is set by the submission below, never guessed from SLURM_JOB_ID (set inside salloc too).
if [[ -z ${FULLFT_PREPARE_ROLE:-} ]]; then  # run by hand: submit the array, then the merge after it
    here=$(cd "$(dirname "$0")" && pwd)
    tasks=${TASKS:-4}
    # shellcheck disable=SC2086  # SBATCH_FLAGS: several flags, split on purpose
    array=$(sbatch --parsable --array=0-$((tasks - 1)) --export=ALL,FULLFT_PREPARE_ROLE=tokenize \
        ${SBATCH_FLAGS:-} "$here/prepare.sh" "$@") || exit 1
    array=${array%%;*}
    # shellcheck disable=SC2086
    if ! merge=$(sbatch --parsable --dependency=afterok:"$array" --export=ALL,FULLFT_PREPARE_ROLE=merge \
        --output=logs/%x-%j.out ${SBATCH_FLAGS:-} "$here/prepare.sh" "$@"); then
        scancel "$array"
        echo "submitting the merge failed: cancelled the array $array" >&2
        exit 1
    fi
    merge=${merge%%;*}
    echo "array $array ($tasks tokenizing tasks), merge $merge (after all of them succeed)"
    echo "train after it: sbatch --dependency=afterok:$merge slurm/cpt.sh $*"
    exit 0
fi

# Slurm runs a spooled copy of this file: find the repository from the path it was submitted with.
if [[ -z ${FULLFT_ROOT:-} ]]; then
    FULLFT_ROOT=$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")/..
    [[ -f $FULLFT_ROOT/slurm/common.sh ]] || FULLFT_ROOT=$SLURM_SUBMIT_DIR
fi
FULLFT_ROOT=$(cd "$FULLFT_ROOT" && pwd)
source "$FULLFT_ROOT/slurm/common.sh"

fullft_setup
EXP=${EXP-medical}
if [[ $FULLFT_PREPARE_ROLE == tokenize ]]; then
    fullft_log "tokenizing task $SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_TASK_COUNT on $(hostname): $(_fullft_redacted "$@")"
    exec python launch/prepare_data.py --shard "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT" ${EXP:+"+exp=$EXP"} "$@"
fi
fullft_log "merging the tokenized units and packing on $(hostname): $(_fullft_redacted "$@")"
exec python launch/prepare_data.py ${EXP:+"+exp=$EXP"} "$@"
