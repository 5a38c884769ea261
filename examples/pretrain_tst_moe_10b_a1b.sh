#!/usr/bin/env bash
# The paper's 10B-A1B MoE run: s=16 for 12483 of 49983 steps, 8M tokens per step (4096 x 2048),
# peak LR 3e-4, Qwen3-MoE-like shape (our preset: 128 experts, top-8), expert parallelism 8.
#   DATA_PATH=... TOKENIZER_MODEL=... CHECKPOINT_DIR=... NNODES=8 NODE_RANK=... MASTER_ADDR=... \
#     bash examples/pretrain_tst_moe_10b_a1b.sh
source "$(dirname "${BASH_SOURCE[0]}")/tst_common.sh"
require DATA_PATH "dataset prefix(es), e.g. '0.5 fineweb_edu_text_document 0.5 dclm_text_document'"
require TOKENIZER_MODEL "the tokenizer (Qwen3's tokenizer.json folder for the preset's vocabulary)"
require CHECKPOINT_DIR "where checkpoints and metrics.jsonl go"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-8}

GPT_MODEL_ARGS=(--model-preset 10B-A1B --seq-length 2048 --max-position-embeddings 8192 --bf16
                --moe-token-dispatcher-type alltoall)
TRAINING_ARGS=(
    --micro-batch-size "${MICRO_BATCH:-2}" --global-batch-size 4096 --train-iters 49983
    --lr 3e-4 --min-lr 0 --lr-decay-style WSD --lr-warmup-iters 2000 --lr-wsd-decay-iters 5000
    --lr-wsd-decay-style linear --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
)
MODEL_PARALLEL_ARGS=(--expert-model-parallel-size 8 --use-distributed-optimizer)
DATA_ARGS=(--data-path $DATA_PATH --split 989,10,1 --tokenizer-type HuggingFaceTokenizer
           --tokenizer-model "$TOKENIZER_MODEL")
EVAL_AND_LOGGING_ARGS=(--save "$CHECKPOINT_DIR" --save-interval 1000 --log-interval 10
                       --eval-interval 2000 --eval-iters 20 --tensorboard-dir "$CHECKPOINT_DIR/tensorboard")
TST_ARGS=(--tst-bag-size 16 --tst-iters 12483)
tst_launch
