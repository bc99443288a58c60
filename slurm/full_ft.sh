#!/bin/bash
# Full fine-tuning / instruction tuning on a Slurm cluster:
#
#   mkdir -p logs && sbatch slurm/full_ft.sh                          # EXP=medical
#   EXP=my_exp sbatch --nodes=4 slurm/full_ft.sh trainer.optim.lr=1e-5      # any #SBATCH line can be overridden
#
# One torchrun per node (srun, no ssh), c10d rendezvous on the first node. USR1 five minutes before
# the walltime (or on a preemption notice): every rank saves at the current step, the job requeues
# itself and resumes from that checkpoint. A rank that dies ends the job at once (FAILED).
# Knobs (EXP, OUTPUT_DIR, NPROC_PER_NODE, LAUNCHER, VENV, ...) are listed in slurm/common.sh.
# Defaults below are for a GPU cluster; on CPU nodes: --gpus-per-node=0 and NPROC_PER_NODE=N.
#SBATCH --job-name=full_ft
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

# Slurm runs a spooled copy of this file: find the repository from the path it was submitted with.
if [[ -n ${SLURM_JOB_ID:-} && -z ${FULLFT_ROOT:-} ]]; then
    FULLFT_ROOT=$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")/..
    [[ -f $FULLFT_ROOT/slurm/common.sh ]] || FULLFT_ROOT=$SLURM_SUBMIT_DIR
fi
FULLFT_ROOT=$(cd "${FULLFT_ROOT:-$(dirname "$0")/..}" && pwd)
source "$FULLFT_ROOT/slurm/common.sh"

fullft_setup
EXP=${EXP-medical}
fullft_launch ${EXP:+"+exp=$EXP"} ${OUTPUT_DIR:+"output_dir=$OUTPUT_DIR"} "$@"
