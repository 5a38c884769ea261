#!/usr/bin/env bash
# Shared by the launch recipes: required-variable checks and the (multi-node) launcher call.
# Each recipe fills the Megatron-style arrays GPT_MODEL_ARGS, TRAINING_ARGS, MODEL_PARALLEL_ARGS,
# DATA_ARGS, EVAL_AND_LOGGING_ARGS and TST_ARGS, then calls `tst_launch`.
#   BASELINE=1  drops TST_ARGS: the matched baseline (same steps, same FLOPs per step)
#   DRY_RUN=1   prints the resolved command and exits
#   FP8=...     FP8 training (see fp8_args below)
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

# FP8=delayed|tensorwise|mxfp8 adds NVIDIA's documented FP8 settings (Transformer Engine; refused in
# one line without it); unset trains in bf16. The matched baseline gets the same. [ours] the choice
# of recipe; the settings are Megatron-LM's / Transformer Engine's:
#   delayed     H100: delayed scaling, --fp8-format hybrid (E4M3 forward, E5M2 gradients), amax
#               history 1024 with max, FP8 parameter all-gather (Megatron-LM's Llama-3 8B H100 FP8
#               example; needs --use-distributed-optimizer)
#   tensorwise  H100: per-tensor current scaling (TE's Float8CurrentScaling), --fp8-format hybrid
#   mxfp8       B200 (Blackwell only): MXFP8 block scaling (32-value blocks, power-of-2 scales),
#               --fp8-format e4m3 (TE's default for MXFP8)
fp8_args() {
    case "${FP8:-}" in
        "") FP8_ARGS=() ;;
        delayed) FP8_ARGS=(--fp8-format hybrid --fp8-recipe delayed --fp8-amax-history-len 1024
                           --fp8-amax-compute-algo max --fp8-param-gather) ;;
        tensorwise) FP8_ARGS=(--fp8-format hybrid --fp8-recipe tensorwise) ;;
        mxfp8) FP8_ARGS=(--fp8-format e4m3 --fp8-recipe mxfp8) ;;
        *) echo "error: FP8 must be delayed or tensorwise (H100), mxfp8 (B200), or unset for bf16; got '$FP8'" >&2
           exit 2 ;;
    esac
}

tst_launch() {
    fp8_args
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
        "${EVAL_AND_LOGGING_ARGS[@]}" ${FP8_ARGS[@]+"${FP8_ARGS[@]}"} ${tst[@]+"${tst[@]}"}
    )
    echo "resolved command:"
    printf ' %q' "${command[@]}"
    echo
    if [ "${DRY_RUN:-0}" = "1" ]; then
        return 0
    fi
    exec "${command[@]}"
}
