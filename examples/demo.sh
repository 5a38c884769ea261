#!/usr/bin/env bash
# make demo: TST ending below its baseline on a laptop (issue 22). Builds a corpus from text the machine
# holds, trains a tokenizer, preprocesses, then trains a baseline and a two-phase TST run side by side
# (one thread each) through the real launcher, reports them (tools/tst_report.py, a figure) and closes with
# the measured gap and the iso-loss ratio.
#   bash examples/demo.sh [workdir]        (default: runs/demo)
# The configuration is the smallest winning one the CPU study found (BENCHMARKS.md, "Where TST pays
# off"); every value can be changed through the environment (the test runs a tiny one):
#   STEPS, BATCH (global batch, in micro-batches of 16), LR, WARMUP, EVAL_INTERVAL, BAG (s), RATIO (r),
#   SHAPE (model flags), SEQ, VOCAB (tokenizer pieces), CORPUS_SOURCES, CORPUS_BYTES.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
WORK=${1:-runs/demo}
STEPS=${STEPS:-8000}
BATCH=${BATCH:-16}
LR=${LR:-1e-3}
WARMUP=${WARMUP:-100}
EVAL_INTERVAL=${EVAL_INTERVAL:-500}
BAG=${BAG:-4}
RATIO=${RATIO:-0.3}
SHAPE=${SHAPE:-"--num-layers 2 --hidden-size 128 --ffn-hidden-size 512 --num-attention-heads 4 --num-query-groups 4"}
SEQ=${SEQ:-64}
VOCAB=${VOCAB:-4096}
CORPUS_SOURCES=${CORPUS_SOURCES:-stdlib,python-doc,gcide}  # the study's corpus (make demo installs the two packages)
CORPUS_BYTES=${CORPUS_BYTES:-400000000}
mkdir -p "$WORK"

missing=()  # the Debian packages behind the corpus sources, installed where this is a Debian machine run as root
case ",$CORPUS_SOURCES," in *,python-doc,*) dpkg -s python3.11-doc > /dev/null 2>&1 || missing+=(python3.11-doc) ;; esac
case ",$CORPUS_SOURCES," in *,gcide,*) dpkg -s dict-gcide > /dev/null 2>&1 || missing+=(dict-gcide) ;; esac
if [ ${#missing[@]} -gt 0 ] && [ ! -f "$WORK/corpus.jsonl" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
        echo "demo: installing ${missing[*]} (text for the corpus)"
        { apt-get install -y -q "${missing[@]}" > "$WORK/apt.log" 2>&1 \
            || { apt-get update -q > /dev/null 2>&1 && apt-get install -y -q "${missing[@]}" > "$WORK/apt.log" 2>&1; }; } \
            || { echo "error: apt-get could not install ${missing[*]} (see $WORK/apt.log); install them, or set CORPUS_SOURCES" >&2; exit 1; }
    else
        echo "error: the demo's corpus needs ${missing[*]}: install them (sudo apt-get install ${missing[*]}), or set CORPUS_SOURCES" >&2
        exit 1
    fi
fi

[ -f "$WORK/corpus.jsonl" ] || "$PYTHON" tools/make_corpus.py --sources "$CORPUS_SOURCES" \
    --output "$WORK/corpus.jsonl" --max-bytes "$CORPUS_BYTES"
[ -f "$WORK/tokenizer.model" ] || OMP_NUM_THREADS=2 "$PYTHON" tools/train_tokenizer.py --input "$WORK/corpus.jsonl" \
    --output-prefix "$WORK/tokenizer" --vocab-size "$VOCAB" --max-bytes 20000000
[ -f "$WORK/corpus_text_document.idx" ] || "$PYTHON" tools/preprocess_data.py --input "$WORK/corpus.jsonl" \
    --output-prefix "$WORK/corpus" --tokenizer-type SentencePieceTokenizer \
    --tokenizer-model "$WORK/tokenizer.model" --append-eod --workers 2

# shellcheck disable=SC2206
common=(-m megatron_tst.launch --nproc-per-node 1 --model-preset tiny $SHAPE --untie-embeddings-and-output-weights
        --seq-length "$SEQ" --max-position-embeddings "$SEQ" --micro-batch-size 16 --global-batch-size "$BATCH"
        --train-iters "$STEPS" --lr "$LR" --min-lr 0 --lr-decay-style WSD --lr-warmup-iters "$WARMUP"
        --lr-wsd-decay-iters $((STEPS / 10)) --lr-wsd-decay-style linear --weight-decay 0.1 --clip-grad 1.0
        --data-path "$WORK/corpus_text_document" --split 98,2,0 --tokenizer-type SentencePieceTokenizer
        --tokenizer-model "$WORK/tokenizer.model" --log-interval 100 --eval-interval "$EVAL_INTERVAL" --eval-iters 16
        --save-interval 1000)
echo "demo: baseline and TST s=$BAG r=$RATIO, $STEPS steps of $BATCH x $SEQ positions, side by side (logs in $WORK/*.log)"
OMP_NUM_THREADS=1 "$PYTHON" "${common[@]}" --save "$WORK/baseline" > "$WORK/baseline.log" 2>&1 &
baseline=$!
OMP_NUM_THREADS=1 "$PYTHON" "${common[@]}" --save "$WORK/tst" --tst-bag-size "$BAG" --tst-ratio "$RATIO" \
    > "$WORK/tst.log" 2>&1 &
tst=$!
status=0
wait "$baseline" || { status=1; echo "error: the baseline run failed; see $WORK/baseline.log" >&2; }
wait "$tst" || { status=1; echo "error: the TST run failed; see $WORK/tst.log" >&2; }
[ "$status" = 0 ] || exit 1

"$PYTHON" tools/tst_report.py "$WORK/tst" --baseline "$WORK/baseline" --output "$WORK/report" > /dev/null
"$PYTHON" - "$WORK" <<'PY'
import importlib.util, os, sys
work = sys.argv[1]
spec = importlib.util.spec_from_file_location("tst_report", os.path.join("tools", "tst_report.py"))
report = sys.modules["tst_report"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)
baseline, tst = report.load_run(os.path.join(work, "baseline")), report.load_run(os.path.join(work, "tst"))
(steps, base_loss), (_, tst_loss) = baseline.final, tst.final
found = report.iso_loss(baseline, tst_loss)
if found["reached"]:
    ratio = f"{'<= ' if found['upper_bound'] else ''}{found['step'] / steps:.2f}x (the baseline reached TST's final loss at step {found['step']:.0f})"
else:
    ratio = (f"> 1.00x (the baseline never reached TST's final loss in its {steps} steps; the study's reading "
             "from baselines trained to other lengths is in BENCHMARKS.md)")
verdict = "below" if tst_loss < base_loss else "above"
print(f"demo: TST ends {verdict} the baseline at equal steps and FLOPs: next-token validation loss "
      f"{tst_loss:.4f} vs {base_loss:.4f} after {steps} steps, a gap of {tst_loss - base_loss:+.4f}; "
      f"iso-loss ratio {ratio}. Report and figure: {os.path.join(work, 'report')}")
PY
