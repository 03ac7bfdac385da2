#!/bin/bash
# Train salt with plain sbatch, for those who prefer it to the Hydra launcher (launcher=slurm).
#
#   sbatch scripts/submit_slurm.sh model=GN2 attention=gatv2 trainer.max_epochs=40
#   sbatch --partition=gpu --gpus-per-node=4 --ntasks-per-node=4 scripts/submit_slurm.sh
#
# The arguments are salt.train's (one run, no -m). Options given to sbatch on the command line
# override the #SBATCH lines below; edit those for your cluster's defaults.
#
# Several GPUs: one task per GPU (--ntasks-per-node = --gpus-per-node); srun starts the tasks and
# they form one DDP run (rank, world size and address from Slurm). Data loading runs in
# data.num_workers processes per task: give each task at least num_workers + 1 CPUs.
#
# Time limits: Slurm sends SIGUSR2 to the training --signal seconds before the limit; salt
# saves at the next step boundary and exits with 140 (128 + 12); this script then requeues
# the job (up to SALT_MAX_REQUEUES times), and the requeued job continues the same run
# directory from its latest complete checkpoint. A cancelled job (scancel: SIGTERM, exit 143)
# is not requeued: continue it by hand with `python -m salt.train resume=<run dir>`.
#
# Environment (set before sbatch; the job inherits it):
#   SALT_PYTHON        the python to run (default: python on PATH after the set-up below)
#   SALT_MAX_REQUEUES  requeues after the pre-timeout signal (default 10)
#
#SBATCH --job-name=salt
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# Cluster-specific (remove one '#' to use):
##SBATCH --partition=gpu
##SBATCH --account=my_account
##SBATCH --qos=normal
##SBATCH --mem=64G
set -uo pipefail

# Relative paths (log_dir, data files) mean the same in every attempt: the submission directory.
cd "${SLURM_SUBMIT_DIR:-.}" || exit 1

# ---- set-up: edit for your cluster ---------------------------------------------------------
# module load cuda/12.4
if [[ -z ${SALT_PYTHON:-} && -f .venv/bin/activate ]]; then
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi
PYTHON=${SALT_PYTHON:-python}
MAX_REQUEUES=${SALT_MAX_REQUEUES:-10}
# ----------------------------------------------------------------------------------------------

attempt=$((${SLURM_RESTART_COUNT:-0} + 1))
echo "salt: job ${SLURM_JOB_ID:-?} attempt $attempt on ${SLURM_JOB_NODELIST:-?}: $*"

# Not --kill-on-bad-exit: after a stop signal rank 0 may still be writing the checkpoint when
# the other ranks have exited.
srun --unbuffered "$PYTHON" -u -m salt.train "$@"
status=$?

if ((status == 140)); then
    if ((${SLURM_RESTART_COUNT:-0} < MAX_REQUEUES)); then
        echo "salt: stopped by the pre-timeout signal; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID" && exit 0
        echo "salt: scontrol requeue failed; continue with resume=<run dir>" >&2
    else
        echo "salt: requeued $MAX_REQUEUES times already; not again (SALT_MAX_REQUEUES)" >&2
    fi
fi
exit "$status"
