#!/usr/bin/env bash
# Multi-node egspo RL training with plain `accelerate launch` (DDP over NCCL, one process per GPU).
# Run it once on every node, from the repository root, with the same NUM_NODES / MASTER_ADDR /
# MASTER_PORT everywhere and each node's own NODE_RANK (0 on the node whose address is MASTER_ADDR):
#
#   node 0:  NUM_NODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 scripts/launch_multinode.sh configs/llada/gsm8k_egspo_sa.yaml
#   node 1:  NUM_NODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 scripts/launch_multinode.sh configs/llada/gsm8k_egspo_sa.yaml
#
# Arguments after the config go to `egspo train` (--resume, field=value overrides).
# output_dir must be on a filesystem that every node sees: all processes write their RNG
# state into the checkpoint directory and read the checkpoint back on --resume.
#
# Environment:
#   NUM_NODES          number of machines (default 1)
#   NODE_RANK          this machine's rank, 0..NUM_NODES-1 (default 0)
#   MASTER_ADDR        address of node 0, reachable from every node (required when NUM_NODES > 1)
#   MASTER_PORT        a free TCP port on node 0 (default 29500)
#   GPUS_PER_NODE      processes per node (default: the GPUs nvidia-smi lists)
#   ACCELERATE_CONFIG  accelerate config file (default configs/accelerate/ddp.yaml)
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: [NUM_NODES=N NODE_RANK=R MASTER_ADDR=HOST] $0 CONFIG.yaml [--resume] [field=value ...]" >&2
  exit 2
fi
CONFIG=$1
shift

NUM_NODES=${NUM_NODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_PORT=${MASTER_PORT:-29500}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-configs/accelerate/ddp.yaml}
if [[ -z ${GPUS_PER_NODE:-} ]]; then
  GPUS_PER_NODE=$(nvidia-smi -L 2>/dev/null | wc -l)
fi
if [[ $GPUS_PER_NODE -lt 1 ]]; then
  echo "No GPU found: set GPUS_PER_NODE (for a CPU test run see docs/distributed.md)." >&2
  exit 2
fi
if [[ $NUM_NODES -gt 1 && -z ${MASTER_ADDR:-} ]]; then
  echo "Set MASTER_ADDR to the address of node 0 (NUM_NODES=$NUM_NODES)." >&2
  exit 2
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}

# accelerate's --num_processes is the total over all machines.
NUM_PROCESSES=$((NUM_NODES * GPUS_PER_NODE))
echo "egspo: node $NODE_RANK/$NUM_NODES, $GPUS_PER_NODE processes here, $NUM_PROCESSES in all, master $MASTER_ADDR:$MASTER_PORT" >&2

exec accelerate launch \
  --config_file "$ACCELERATE_CONFIG" \
  --num_machines "$NUM_NODES" \
  --machine_rank "$NODE_RANK" \
  --num_processes "$NUM_PROCESSES" \
  --main_process_ip "$MASTER_ADDR" \
  --main_process_port "$MASTER_PORT" \
  -m egspo.cli train --config "$CONFIG" "$@"
