#!/usr/bin/env bash
# The paper's dense runs (Table 1): MODEL=270M|600M|3B, s=6, r=0.3, 2M tokens per step.
#   DATA_PATH=... TOKENIZER_MODEL=... CHECKPOINT_DIR=... MODEL=270M bash examples/pretrain_tst_dense.sh
#   BASELINE=1 ...                      the matched baseline (same steps, same FLOPs per step)
#   TRAIN_ITERS=N (default 20000)       the paper's rows: 20000 for every size; 100000 for 270M
#                                       (MODEL=270M TRAIN_ITERS=100000: 30000 TST steps, the 270M/100k
#                                       row); the 3B equal-loss / equal-data baselines
#                                       BASELINE=1 MODEL=3B TRAIN_ITERS=36000 and TRAIN_ITERS=50000.
# Provenance of every value: [paper] stated in the paper, [public config] the SmolLM2/SmolLM3 shapes
# the paper names, [ours] our choice where the paper is silent.
source "$(dirname "${BASH_SOURCE[0]}")/tst_common.sh"
require DATA_PATH "dataset prefix from tools/preprocess_data.py, or 'w1 prefix1 w2 prefix2'"
require TOKENIZER_MODEL "the tokenizer (Llama-3's tokenizer.json folder for the paper's vocabulary)"
require CHECKPOINT_DIR "where checkpoints and metrics.jsonl go"
MODEL=${MODEL:-270M}
case "$MODEL" in
    270M) LR=2e-3; TP=1 ;;  # [paper] peak LRs (270M and 600M by sweep, 3B "recommended"); TP [ours]
    600M) LR=1e-3; TP=1 ;;
    3B)   LR=2e-4; TP=2 ;;
    *) echo "error: MODEL must be 270M, 600M or 3B, got $MODEL" >&2; exit 2 ;;
esac
TRAIN_ITERS=${TRAIN_ITERS:-20000}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
MICRO_BATCH=${MICRO_BATCH:-4}

GPT_MODEL_ARGS=(
    --model-preset "$MODEL"                  # [public config] shapes; untied, Llama-3 vocabulary [paper]
    --seq-length 2048 --max-position-embeddings 2048   # [ours] the paper never states it
    --bf16                                   # [ours]
)
TRAINING_ARGS=(
    --micro-batch-size "$MICRO_BATCH"        # [ours] the micro-batch split
    --global-batch-size 1024                 # [paper] 2M tokens per step (1024 x 2048 = 2^21)
    --train-iters "$TRAIN_ITERS"             # [paper] 20000 (270M also 100000; 3B baselines 36000, 50000)
    --lr "$LR"                               # [paper]
    --min-lr 0                               # [ours] not stated
    --lr-decay-style WSD --lr-warmup-iters 2000        # [paper] WSD, a constant 2000 warm-up steps
    --lr-wsd-decay-iters $((TRAIN_ITERS / 10))         # [paper] decay over the last 10% of the steps
    --lr-wsd-decay-style linear              # [ours] the decay shape is not stated
    --weight-decay 0.1                       # [ours] not stated
    --adam-beta1 0.9 --adam-beta2 0.95       # [paper] AdamW betas
    --clip-grad 1.0                          # [ours] not stated
    --seed "${SEED:-1234}"
)
MODEL_PARALLEL_ARGS=(--tensor-model-parallel-size "$TP" --use-distributed-optimizer)  # [ours] (paper: FSDP)
if [ "$TP" -gt 1 ]; then MODEL_PARALLEL_ARGS+=(--sequence-parallel); fi
DATA_ARGS=(--data-path $DATA_PATH --split 989,10,1 --tokenizer-type HuggingFaceTokenizer  # split [ours]
           --tokenizer-model "$TOKENIZER_MODEL")                                          # data: DCLM [paper]
EVAL_AND_LOGGING_ARGS=(--save "$CHECKPOINT_DIR" --save-interval 1000 --log-interval 10   # [ours]
                       --eval-interval 1000 --eval-iters 20 --tensorboard-dir "$CHECKPOINT_DIR/tensorboard")
TST_ARGS=(--tst-bag-size 6 --tst-ratio 0.3)  # [paper] s=6, r=0.3 in every headline dense run
tst_launch
