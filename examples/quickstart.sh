#!/usr/bin/env bash
# The README's main job, on CPU in minutes: build a corpus from text already on this machine, train a
# tokenizer, preprocess to Megatron's format, then train a tiny baseline and a tiny two-phase TST run
# at equal steps (equal FLOPs) and compare them with tools/tst_report.py (tables, iso-loss, figure).
#   bash examples/quickstart.sh [workdir]        (default: runs/quickstart)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
WORK=${1:-runs/quickstart}
mkdir -p "$WORK"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

[ -f "$WORK/corpus.jsonl" ] || "$PYTHON" tools/make_corpus.py --sources stdlib --output "$WORK/corpus.jsonl" \
    --max-bytes "${CORPUS_BYTES:-12000000}"
[ -f "$WORK/tokenizer.model" ] || "$PYTHON" tools/train_tokenizer.py --input "$WORK/corpus.jsonl" \
    --output-prefix "$WORK/tokenizer" --vocab-size 4096 --max-bytes 6000000
[ -f "$WORK/corpus_text_document.idx" ] || "$PYTHON" tools/preprocess_data.py --input "$WORK/corpus.jsonl" \
    --output-prefix "$WORK/corpus" --tokenizer-type SentencePieceTokenizer \
    --tokenizer-model "$WORK/tokenizer.model" --append-eod --workers 2

export DATA_PATH="$WORK/corpus_text_document" TOKENIZER_MODEL="$WORK/tokenizer.model"
export GPUS_PER_NODE=1 TP=1 TRAIN_ITERS=${TRAIN_ITERS:-300} PYTHON
CHECKPOINT_DIR="$WORK/baseline" BASELINE=1 bash examples/pretrain_tst_tiny_cpu.sh
CHECKPOINT_DIR="$WORK/tst" bash examples/pretrain_tst_tiny_cpu.sh

"$PYTHON" tools/tst_report.py "$WORK/tst" --baseline "$WORK/baseline" --output "$WORK/report"
echo "What this means: at this size (2 layers, ${TRAIN_ITERS} steps on CPU) the comparison shows the machinery end"\
" to end, not the paper's result; the paper's gain (e.g. 3.212 -> 3.142 at 270M params, 20k steps of 2M"\
" tokens) is measured far above this scale; here expect TST above the baseline: in our CPU study (BENCHMARKS.md)"\
" it loses at 2000 steps at every size and wins only in longer runs (8000 steps of a 0.5M model: -0.043)."
echo "checkpoints and metrics.jsonl: $WORK/baseline, $WORK/tst/superposition, $WORK/tst/recovery"
