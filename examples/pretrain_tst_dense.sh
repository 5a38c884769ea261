#!/usr/bin/env bash
# The paper's dense runs: MODEL=270M|600M|3B, s=6, r=0.3 of 20000 steps, 2M tokens per step
# (1024 x 2048), WSD with 2000 warm-up steps and a linear decay over the last 10%, AdamW(0.9, 0.95).
# The sequence length is not stated in the paper; 2048 is ours.
#   DATA_PATH=... TOKENIZER_MODEL=... CHECKPOINT_DIR=... MODEL=270M bash examples/pretrain_tst_dense.sh
#   BASELINE=1 ... for the matched baseline.
source "$(dirname "${BASH_SOURCE[0]}")/tst_common.sh"
require DATA_PATH "dataset prefix from tools/preprocess_data.py, or 'w1 prefix1 w2 prefix2'"
require TOKENIZER_MODEL "the tokenizer (Llama-3's tokenizer.json folder for the paper's vocabulary)"
require CHECKPOINT_DIR "where checkpoints and metrics.jsonl go"
MODEL=${MODEL:-270M}
case "$MODEL" in
    270M) LR=2e-3; TP=1 ;;
    600M) LR=1e-3; TP=1 ;;
    3B)   LR=2e-4; TP=2 ;;
    *) echo "error: MODEL must be 270M, 600M or 3B, got $MODEL" >&2; exit 2 ;;
esac
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
MICRO_BATCH=${MICRO_BATCH:-4}

GPT_MODEL_ARGS=(--model-preset "$MODEL" --seq-length 2048 --max-position-embeddings 2048 --bf16)
TRAINING_ARGS=(
    --micro-batch-size "$MICRO_BATCH" --global-batch-size 1024 --train-iters 20000
    --lr "$LR" --min-lr 0 --lr-decay-style WSD --lr-warmup-iters 2000 --lr-wsd-decay-iters 2000
    --lr-wsd-decay-style linear --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
    --seed "${SEED:-1234}"
)
MODEL_PARALLEL_ARGS=(--tensor-model-parallel-size "$TP" --use-distributed-optimizer)
if [ "$TP" -gt 1 ]; then MODEL_PARALLEL_ARGS+=(--sequence-parallel); fi
DATA_ARGS=(--data-path $DATA_PATH --split 989,10,1 --tokenizer-type HuggingFaceTokenizer
           --tokenizer-model "$TOKENIZER_MODEL")
EVAL_AND_LOGGING_ARGS=(--save "$CHECKPOINT_DIR" --save-interval 1000 --log-interval 10
                       --eval-interval 1000 --eval-iters 20 --tensorboard-dir "$CHECKPOINT_DIR/tensorboard")
TST_ARGS=(--tst-bag-size 6 --tst-ratio 0.3)
tst_launch
