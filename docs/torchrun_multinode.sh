#!/usr/bin/env bash
# Stages 1-3 of Quality-Gate over several nodes with torchrun (c10d rendezvous, no launcher daemon).
#
# Start the same command on every node at about the same time; only NODE_RANK differs:
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 OUTPUT_ROOT=/shared/qg/run1 \
#       bash docs/torchrun_multinode.sh                                   # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 MASTER_PORT=29500 OUTPUT_ROOT=/shared/qg/run1 \
#       bash docs/torchrun_multinode.sh                                   # on node1
#
# Under Slurm, one task per node: `srun --nodes=2 --ntasks-per-node=1 bash docs/torchrun_multinode.sh`
# (NNODES, NODE_RANK and MASTER_ADDR default to SLURM_NNODES, SLURM_NODEID and the job's first host).
#
# What runs, in order, each stage a separate torchrun launch over all nodes:
#   1. warmup   -> $OUTPUT_ROOT/warmup/full_rank_weights.pt               (DDP)
#   2. collect  -> $OUTPUT_ROOT/collect/router_data/                      (shards split over all ranks)
#      select   -> $OUTPUT_ROOT/collect/selected_data.jsonl               (node 0 only, one CPU process)
#   3. finetune -> $OUTPUT_ROOT/finetune/checkpoint-final/                (FSDP on GPUs, DDP/gloo on CPU)
# A node that reaches a stage first waits in that stage's rendezvous until every node has joined
# (RDZV_TIMEOUT), so node 1 cannot start Stage 3 before node 0 has written the selection.
#
# Environment:
#   OUTPUT_ROOT      required: a dir on a filesystem every node mounts (the stages refuse a multi-node
#                    launch without an explicit output_dir: see docs/cluster.md)
#   NNODES           number of nodes (default: $SLURM_NNODES, else 2)
#   NODE_RANK        this node, 0 .. NNODES-1 (default: $SLURM_NODEID, else 0)
#   NPROC_PER_NODE   processes per node (default: the GPUs torch sees on this node, else 1)
#   MASTER_ADDR      a host every node reaches (default: the first host of the Slurm job, else 127.0.0.1)
#   MASTER_PORT      first of three free ports, one rendezvous per stage (default 29500)
#   RDZV_ID          rendezvous id, the same on every node (default: qg-$SLURM_JOB_ID, else quality-gate)
#   RDZV_TIMEOUT     seconds a node waits for the others in each rendezvous (default 3600)
#   PYTHON           the interpreter with quality-gate installed (default: python)
#   WARMUP_ARGS, COLLECT_ARGS, SELECT_ARGS, FINETUNE_ARGS
#                    extra key=value overrides of each stage, space separated (no spaces inside a value)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${OUTPUT_ROOT:?set OUTPUT_ROOT to a directory on a filesystem every node mounts}"
PYTHON=${PYTHON:-python}
NNODES=${NNODES:-${SLURM_NNODES:-2}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
if [[ -z "${MASTER_ADDR:-}" ]]; then
    if [[ -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol >/dev/null; then
        MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    else
        MASTER_ADDR=127.0.0.1
    fi
fi
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-qg-${SLURM_JOB_ID:-quality-gate}}
RDZV_TIMEOUT=${RDZV_TIMEOUT:-3600}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
read -r -a WARMUP <<<"${WARMUP_ARGS:-}"
read -r -a COLLECT <<<"${COLLECT_ARGS:-}"
read -r -a SELECT <<<"${SELECT_ARGS:-}"
read -r -a FINETUNE <<<"${FINETUNE_ARGS:-}"

# launch <port offset> <config> <overrides...>: one torchrun over all nodes. The rendezvous assigns the
# global ranks (node 0 need not get RANK 0); global rank 0 writes the shared files, wherever it runs.
launch() {
    local offset=$1 config=$2
    shift 2
    echo "[node $NODE_RANK] $config: torchrun over $NNODES nodes x $NPROC_PER_NODE processes" >&2
    "$PYTHON" -m torch.distributed.run \
        --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" --node_rank="$NODE_RANK" \
        --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$((MASTER_PORT + offset))" \
        --rdzv-id="$RDZV_ID-$config" --rdzv-conf="join_timeout=$RDZV_TIMEOUT,read_timeout=$RDZV_TIMEOUT" \
        "$REPO/src/main.py" --config-name "$config" "$@"
}

# One rendezvous port per stage: a node that finished a stage early must not join the next stage's
# rendezvous on a store that the previous stage's host is about to shut down.
launch 0 warmup output_dir="$OUTPUT_ROOT/warmup" "${WARMUP[@]}"
launch 1 collect model_checkpoint_path="$OUTPUT_ROOT/warmup" output_dir="$OUTPUT_ROOT/collect" "${COLLECT[@]}"
if [[ "$NODE_RANK" == 0 ]]; then
    "$PYTHON" "$REPO/src/main.py" --config-name select root_dir="$OUTPUT_ROOT/collect" "${SELECT[@]}"
fi
launch 2 finetune dataset.data_path="$OUTPUT_ROOT/collect/selected_data.jsonl" \
    output_dir="$OUTPUT_ROOT/finetune" "${FINETUNE[@]}"
echo "[node $NODE_RANK] done: $OUTPUT_ROOT/{warmup,collect,finetune}" >&2
