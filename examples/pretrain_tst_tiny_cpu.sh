#!/usr/bin/env bash
# A tiny two-phase TST run that finishes in minutes on a CPU (2 processes: TP=2 over gloo by default).
#   DATA_PATH=... TOKENIZER_MODEL=... CHECKPOINT_DIR=... bash examples/pretrain_tst_tiny_cpu.sh
# (`make quickstart` builds such a dataset and tokenizer from text already on the machine.)
# Provenance: every value here is [ours], sized for a CPU demo; only the method's defaults follow the
# paper's recipe (WSD with the decay over the last steps, AdamW betas 0.9/0.95 by default, s in 4-8).
source "$(dirname "${BASH_SOURCE[0]}")/tst_common.sh"
require DATA_PATH "dataset prefix from tools/preprocess_data.py"
require TOKENIZER_MODEL "SentencePiece .model from tools/train_tokenizer.py"
require CHECKPOINT_DIR "where checkpoints and metrics.jsonl go"
GPUS_PER_NODE=${GPUS_PER_NODE:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

GPT_MODEL_ARGS=(--model-preset tiny --num-layers 2 --hidden-size 128 --ffn-hidden-size 512
                --seq-length 64 --max-position-embeddings 64)
TRAINING_ARGS=(--micro-batch-size 8 --global-batch-size 16 --train-iters "${TRAIN_ITERS:-300}" --lr 3e-3
               --lr-warmup-iters 30 --lr-decay-style WSD --lr-wsd-decay-iters 60 --clip-grad 1.0)
MODEL_PARALLEL_ARGS=(--tensor-model-parallel-size "${TP:-2}")
DATA_ARGS=(--data-path $DATA_PATH --split 98,2,0 --tokenizer-type SentencePieceTokenizer
           --tokenizer-model "$TOKENIZER_MODEL")
EVAL_AND_LOGGING_ARGS=(--save "$CHECKPOINT_DIR" --save-interval 100 --log-interval 25
                       --eval-interval 100 --eval-iters 8)
TST_ARGS=(--tst-bag-size 4 --tst-ratio 0.3)
tst_launch
