#!/bin/bash
# Batch script of dsl job two-node, written by dsl <VERSION> from <ROOT>/tests/golden/two-node.yaml.
# Submit it with `sbatch /scratch/runs/two-node/sbatch.sh` (`dsl launch` does, and follows the job).
# Secret variables (HF_TOKEN) are not written here: sbatch passes them on from the environment
# you submit from.
#SBATCH --job-name=two-node
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --partition=gpu
#SBATCH --account=ml-team
#SBATCH --qos=high
#SBATCH --time=90
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --constraint=h100
#SBATCH --mem=200G
#SBATCH --exclusive
#SBATCH --output=/scratch/runs/two-node/slurm-%j.out
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --mail-type=END,FAIL
#SBATCH '--comment=it'"'"'s "quoted" $HOME'
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
export DSL_JOB_NAME=two-node
export DSL_OUTPUT_DIR=/scratch/runs/two-node
export DSL_COLLECTIVE_TIMEOUT_S=360
export NCCL_DEBUG=WARN
export TRICKY='a b; echo pwned $(id) '"'"'q'"'"' "dq"'

if [ "$#" -gt 0 ]; then
    echo "dsl: this job runs the bundled trainer (run.train), which takes no arguments; got: $*" >&2
    exit 2
fi

# One task per node starts that node's ranks. --kill-on-bad-exit ends every node's task when
# one fails; --label tags each output line with the node's task id (dsl maps it to the host).
# requeue: true. Exit 75: every rank checkpointed at the time-limit signal; requeued, the job
# starts again and resumes from that checkpoint.
code=0
srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --label --export=ALL --cpus-per-task="$SLURM_CPUS_PER_TASK" bash -c 'export NODE_RANK="$SLURM_NODEID"; cd /home/alice/project && exec /opt/venv/bin/python -m dsl.launcher.host.guard --grace-s=3 --checkpointed-linger-s=5 -- /opt/venv/bin/python -m dsl.launcher.host.elastic --nnodes="$NNODES" --node-rank="$SLURM_NODEID" --nproc-per-node=4 --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" --max-restarts=0 --monitor-interval=0.1 --shutdown-timeout=3 --tee=3 --log-dir=/scratch/runs/two-node/logs/torchelastic/"$SLURMD_NODENAME" -m dsl.engine.train /scratch/runs/two-node/resolved.yaml' || code=$?
if [ "$code" -eq 75 ]; then
    echo "dsl: every rank checkpointed at the time-limit signal (exit 75); requeueing job $SLURM_JOB_ID to resume" >&2
    scontrol requeue "$SLURM_JOB_ID" || echo "dsl: scontrol requeue failed (not a batch job?); submit the script again to resume" >&2
fi
exit "$code"
