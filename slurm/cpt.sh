#!/bin/bash
# Continued (domain) pretraining on a Slurm cluster: loss on every token, documents packed.
#
#   mkdir -p logs && sbatch slurm/cpt.sh                               # the embedded default: medical notes
#   EXP=my_cpt sbatch --nodes=2 slurm/cpt.sh data.path=/shared/corpus/
#
# Same launch, preemption and failure handling as slurm/full_ft.sh (see slurm/common.sh).
#SBATCH --job-name=cpt
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
fullft_launch ${EXP:+"+exp=$EXP"} stage=pretrain ${OUTPUT_DIR:+"output_dir=$OUTPUT_DIR"} "$@"
