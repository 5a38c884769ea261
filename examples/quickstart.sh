#!/usr/bin/env bash
# The README's main job, on CPU in minutes: build a corpus from text already on this machine, train a
# tokenizer, preprocess to Megatron's format, then train a tiny baseline and a tiny two-phase TST run
# at equal steps (equal FLOPs) and print their next-token validation losses side by side.
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

"$PYTHON" - "$WORK" <<'PY'
import json, os, sys
work = sys.argv[1]
def last_validation(path):
    rows = [json.loads(line) for line in open(path)]
    return [r for r in rows if "validation_loss" in r][-1], [r for r in rows if "loss" in r][-1]
base, base_step = last_validation(os.path.join(work, "baseline", "metrics.jsonl"))
tst, tst_step = last_validation(os.path.join(work, "tst", "recovery", "metrics.jsonl"))
print(f"\nnext-token validation loss after {base['iteration']} equal-FLOPs steps:")
print(f"  baseline  {base['validation_loss']:.4f}   ({base_step['raw_tokens']:,} raw training tokens)")
print(f"  TST       {tst['validation_loss']:.4f}   ({tst_step['raw_tokens']:,} raw training tokens, s=4, r=0.3)")
print(f"checkpoints and metrics.jsonl: {work}/baseline, {work}/tst/superposition, {work}/tst/recovery")
PY
