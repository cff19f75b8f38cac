#!/usr/bin/env bash
# Start dpkit on ONE node of a multi-node job. Run the same line on every node (by hand, pdsh, or
# your scheduler); only NODE_RANK differs. It validates the recipe, then runs `dpkit train` with
# the multi-node flags, which starts the chosen launcher for this node's ranks.
#
#   NODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 scripts/launch_multinode.sh RECIPE [key=value ...]
#   HOSTFILE=hosts scripts/launch_multinode.sh RECIPE    # nodes, ranks per node and node 0 from
#                                                        # the hostfile; node rank: this host's line
#   DRY_RUN=1 NODES=2 scripts/launch_multinode.sh RECIPE # print every node's command, run nothing
#   NODES=1:2 MASTER_ADDR=10.0.0.1 scripts/launch_multinode.sh RECIPE train.max_restarts=2
#                                                        # elastic (torchrun): when a node dies the
#                                                        # others go on from the last checkpoint
#
# Settings (environment): LAUNCHER torchrun|accelerate|deepspeed (default torchrun), NODES (N, or
# MIN:MAX with torchrun: c10d rendezvous, no NODE_RANK needed), NODE_RANK, MASTER_ADDR,
# MASTER_PORT (default 29500), NPROC_PER_NODE (default: the hostfile's slots, else one rank per
# GPU), HOSTFILE, RDZV_CONF (with MIN:MAX: more key=value,... for torchrun's c10d rendezvous),
# PYTHON (default python), DRY_RUN=1. Inside a SLURM
# allocation NODES, NODE_RANK and MASTER_ADDR default to SLURM_NNODES, SLURM_NODEID and the
# allocation's first host. LAUNCHER=deepspeed with NODE_RANK runs without ssh, once per node; with
# HOSTFILE and no NODE_RANK it is run on node 0 only and ssh-starts (pdsh) every host.
set -euo pipefail

RECIPE=${1:?usage: NODES=N NODE_RANK=R MASTER_ADDR=HOST scripts/launch_multinode.sh RECIPE [key=value ...]}
shift
if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
    NODES=${NODES:-${SLURM_NNODES:-}}
    NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-}}
    MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)}
fi

args=(train "$RECIPE" "$@" --launcher "${LAUNCHER:-torchrun}" --master-port "${MASTER_PORT:-29500}")
[[ -n "${NODES:-}" ]] && args+=(--nodes "$NODES")
[[ -n "${NODE_RANK:-}" ]] && args+=(--node-rank "$NODE_RANK")
[[ -n "${MASTER_ADDR:-}" ]] && args+=(--master-addr "$MASTER_ADDR")
[[ -n "${NPROC_PER_NODE:-}" ]] && args+=(--nproc-per-node "$NPROC_PER_NODE")
[[ -n "${HOSTFILE:-}" ]] && args+=(--hostfile "$HOSTFILE")
[[ -n "${RDZV_CONF:-}" ]] && args+=(--rdzv-conf "$RDZV_CONF")
[[ "${DRY_RUN:-0}" != 0 ]] && args+=(--dry-run)
exec "${PYTHON:-python}" -m dpkit.cli "${args[@]}"
