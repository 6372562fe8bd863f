#!/bin/bash
# Batch script of dsl job sl, written by dsl <VERSION> from <RUN>/job.yaml.
# Submit it with `sbatch <RUN>/out/sbatch.sh` (`dsl launch` does, and follows the job).
# Secret variables (none) are not written here: sbatch passes them on from the environment
# you submit from.
#SBATCH --job-name=sl
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --time=5
#SBATCH --output=<RUN>/out/slurm-%j.out
#SBATCH --open-mode=append
set -euo pipefail

# Rank 0 runs on the first host of the allocation.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # reads all: no SIGPIPE under pipefail
MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
# Nodes: the allocation's, so `sbatch --nodes=N` runs this script on N nodes (DSL_NNODES: what
# `dsl launch` asks for inside an existing allocation)
NNODES=${DSL_NNODES:-$SLURM_JOB_NUM_NODES}
export NNODES
export MASTER_ADDR MASTER_PORT
export PYTHONUNBUFFERED=1
export DSL_JOB_NAME=sl
export DSL_OUTPUT_DIR=<RUN>/out
export DSL_COLLECTIVE_TIMEOUT_S=360

# One task per node starts that node's ranks. --kill-on-bad-exit ends every node's task when
# one fails; --label tags each output line with the node's task id (dsl maps it to the host).
srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --label --export=ALL bash -c 'export NODE_RANK="$SLURM_NODEID"; cd <RUN> && exec <PYTHON> -m dsl.launcher.host.guard --grace-s=3 --checkpointed-linger-s=5 -- <PYTHON> -m dsl.launcher.host.elastic --nnodes="$NNODES" --node-rank="$SLURM_NODEID" --nproc-per-node=2 --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" --max-restarts=0 --monitor-interval=0.1 --shutdown-timeout=3 --tee=3 --log-dir=<RUN>/out/logs/torchelastic/"$SLURMD_NODENAME" <ROOT>/tests/integration/scripts/torchrun_script.py "$@"' dsl-node "$@"
