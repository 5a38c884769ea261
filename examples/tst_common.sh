#!/usr/bin/env bash
# Shared by the launch recipes: required-variable checks and the (multi-node) launcher call.
# Each recipe fills the Megatron-style arrays GPT_MODEL_ARGS, TRAINING_ARGS, MODEL_PARALLEL_ARGS,
# DATA_ARGS, EVAL_AND_LOGGING_ARGS and TST_ARGS, then calls `tst_launch`.
#   BASELINE=1  drops TST_ARGS: the matched baseline (same steps, same FLOPs per step)
#   DRY_RUN=1   prints the resolved command and exits
# Multi-node (torchrun rendezvous): NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE.
# Recipes tag each value [paper] (stated in arXiv 2605.06546), [public config] (the model shapes the
# paper names) or [ours] (the paper is silent: sequence length, min LR, weight decay, clipping, decay
# shape, parallel layout, split, evaluation cadence).
set -euo pipefail

require() {  # require VAR "what it is"
    if [ -z "${!1:-}" ]; then
        echo "error: set $1 ($2)" >&2
        exit 2
    fi
}

tst_launch() {
    local python="${PYTHON:-python}"
    local launcher=(
        --nproc-per-node "${GPUS_PER_NODE:-1}" --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}"
        --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}"
    )
    local tst=("${TST_ARGS[@]}")
    if [ "${BASELINE:-0}" = "1" ]; then
        tst=()
    fi
    local command=(
        "$python" -m megatron_tst.launch "${launcher[@]}"
        "${GPT_MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${MODEL_PARALLEL_ARGS[@]}" "${DATA_ARGS[@]}"
        "${EVAL_AND_LOGGING_ARGS[@]}" ${tst[@]+"${tst[@]}"}
    )
    echo "resolved command:"
    printf ' %q' "${command[@]}"
    echo
    if [ "${DRY_RUN:-0}" = "1" ]; then
        return 0
    fi
    exec "${command[@]}"
}
