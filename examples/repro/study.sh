#!/usr/bin/env bash
# Does TST pay off below 270M parameters? The small-scale study of issue 10 on a 2-core CPU, with
# every run through the real launcher (resumable: rerun the same command after an interruption).
#
#   bash examples/repro/study.sh                 all stages in order: corpus lr size steps long grid crossover
#                                                batch seeds sr corpus2 report
#   bash examples/repro/study.sh lr size         only these stages (each skips finished runs)
#   DRY_RUN=1 bash examples/repro/study.sh       print every run's exact command, run nothing
#
# Stages (see examples/repro/README.md for the design and the expected CPU time):
#   corpus  a real text corpus from this machine (tools/make_corpus.py: stdlib, python-doc and gcide,
#           not the linux sources, corpus2's, even where installed), a 4096-piece tokenizer, .bin/.idx
#   lr      baselines at 3-5 learning rates per size (S ~0.5M, M ~4.2M, L ~14M non-embedding
#           parameters); the best final validation loss picks the size's LR, reused for TST
#   size    TST s=4 r=0.3 at each size; tied and untied embeddings at M (baseline and TST)
#   steps   gap vs training length: baseline and TST s=4 r=0.3 at S for T in $T_SWEEP (default
#           8000 4000; T=2000 is the size stage's), the lr, warm-up and evaluation interval of T=2000
#   long    where TST wins (S at T=$T_LONG, default 8000): the baseline's lr rechecked at that
#           length (the S rate and its neighbours), then at the best of them a 2T baseline (the
#           iso-loss ratio), input-only, output-only, reinit-at-switch (s=4, r=0.3), s in {2,8}
#           at r=0.3, and a second seed of the baseline and TST s=4 r=0.3
#   grid    at L: input-only, output-only, reinit-at-switch (s=4, r=0.3); s in {2,4,8} x r in
#           {0.2,0.4}; power weighting at s=8 r=0.4; a 2T-step baseline for the iso-loss reading
#   crossover does S's win at T=$T_LONG hold one size up: M's baseline and TST s=4 r=0.3 at T_LONG,
#           M's lr (set by step count, M wins too; by tokens per parameter, 4x fewer, it does not)
#   batch   steps or tokens (issue 22): S at global batch 64, T=500 and 2000 (batch 16's tokens at 2000 and
#           8000), the baseline's rate tuned per length, TST s=4 r=0.3 at the best, a length ladder; and the
#           batch-16 T=2000 pair again with today's code
#   seeds   the winning pair (S, T=$T_LONG, s=4 r=0.3) at five seeds (B64_SEEDS=1: batch 64 at T=2000 too)
#   sr      s in {2,3,4,6} x r in {0.2,0.3,0.4} at S, T=$T_LONG, and the grid's best cell (SR_BEST) at the
#           second and third seeds beside s=4 r=0.3
#   corpus2 the winning pair on a second corpus (Linux kernel sources, its own tokenizer), two seeds, and
#           the baseline's rate rechecked there
#   report  tools/tst_report.py per comparison, and the gap-vs-size plot (gap_vs_size.py)
# Stages run only when named (a GPU machine; see examples/repro/gpu_size_up.sh):
#   gpu     one size up: L and XL (~34M), baseline and TST s=4 r=0.3 at gpu_rates, all runs at once
#   gpu_report  the gpu stage's reports and gap plot
# Expected CPU time (examples/repro/README.md, measured per size): S ~7 min, M ~20 min, L ~50 min a
# run; the whole study about 23 hours of one core.
# Environment: STUDY (output root, default runs/study), STEPS (T, default 2000), T_SWEEP, T_LONG, SIZES (the
# lr and size stages' sizes, default "S M L"), B64_LR (batch 64's rate at T=2000 where its sweep is not in
# STUDY), RUN_FILTER (a bash regex: only the runs whose names match, so two one-thread lanes can share the
# machine without starting the same run), PYTHON, OMP_NUM_THREADS.
# Commands run are appended to $STUDY/commands.txt.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PYTHON=${PYTHON:-python}
STUDY=${STUDY:-runs/study}
STEPS=${STEPS:-2000}
DRY_RUN=${DRY_RUN:-0}
SIZES=${SIZES:-S M L}
GPU_SIZES=${GPU_SIZES:-L XL}
T_SWEEP=${T_SWEEP:-8000 4000}
T_LONG=${T_LONG:-8000}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
RUNS="$STUDY/runs"
DATA="$STUDY/corpus_text_document"
TOKENIZER="$STUDY/tokenizer.model"

size_args() {  # non-embedding parameters: S 0.52M, M 4.2M, L 14.2M, XL 33.6M (4096-piece vocabulary)
    case "$1" in
        S) echo "--num-layers 2 --hidden-size 128 --ffn-hidden-size 512 --num-attention-heads 4 --num-query-groups 4" ;;
        M) echo "--num-layers 4 --hidden-size 256 --ffn-hidden-size 1024 --num-attention-heads 4 --num-query-groups 4" ;;
        L) echo "--num-layers 6 --hidden-size 384 --ffn-hidden-size 1536 --num-attention-heads 6 --num-query-groups 6" ;;
        XL) echo "--num-layers 8 --hidden-size 512 --ffn-hidden-size 2048 --num-attention-heads 8 --num-query-groups 8" ;;
    esac
}
learning_rates() {  # the baseline sweep per size (larger models want lower rates)
    case "$1" in S) echo "5e-4 1e-3 2e-3 4e-3 8e-3" ;; M) echo "2.5e-4 5e-4 1e-3 2e-3 4e-3" ;; L) echo "2.5e-4 5e-4 1e-3" ;; esac
}

finished() {  # finished RUN_DIR STEPS: the run's final checkpoint exists (baseline, recovery, or r=1)
    local dir
    for dir in "$1" "$1/recovery" "$1/superposition"; do
        [ "$(cat "$dir/latest_checkpointed_iteration.txt" 2>/dev/null)" = "$2" ] && return 0
    done
    return 1
}

run() {  # [TIED=1] [GLOBAL_BATCH=B] [WARMUP=N] run NAME SIZE LR STEPS [launcher or pretrain flags...]
    # (WARMUP: the warm-up steps and the evaluation interval, default STEPS/20)
    local name=$1 size=$2 lr=$3 steps=$4 untie=(--untie-embeddings-and-output-weights)  # the paper's models
    shift 4
    if [ -n "${RUN_FILTER:-}" ] && ! [[ $name =~ $RUN_FILTER ]]; then return 0; fi  # another lane's run
    if [ "${TIED:-0}" = "1" ]; then untie=(--tie-embeddings-and-output-weights); fi
    # shellcheck disable=SC2046
    local command=(
        "$PYTHON" -m megatron_tst.launch --nproc-per-node 1
        --model-preset tiny $(size_args "$size") ${untie[@]+"${untie[@]}"}
        --seq-length 64 --max-position-embeddings 64
        --micro-batch-size 16 --global-batch-size "${GLOBAL_BATCH:-16}" --train-iters "$steps"
        --lr "$lr" --min-lr 0 --lr-decay-style WSD --lr-warmup-iters "${WARMUP:-$((STEPS / 20))}"
        --lr-wsd-decay-iters $((steps / 10)) --lr-wsd-decay-style linear
        --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --seed 1234
        --data-path "$DATA" --split 98,2,0 --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER"
        --log-interval 10 --eval-interval "${WARMUP:-$((STEPS / 20))}" --eval-iters 16
        --save "$RUNS/$name" --save-interval 250
        "$@"
    )
    if [ "$DRY_RUN" = "1" ]; then
        printf '%q ' "${command[@]}"
        echo
        return 0
    fi
    if finished "$RUNS/$name" "$steps"; then
        echo "[study] $name: finished, skipped"
        return 0
    fi
    mkdir -p "$STUDY"
    printf '%q ' "${command[@]}" >> "$STUDY/commands.txt"
    echo >> "$STUDY/commands.txt"
    echo "[study] $name"
    "${command[@]}"
    if ! finished "$RUNS/$name" "$steps"; then  # stopped early (signal): rerun the study to resume
        echo "[study] $name stopped before step $steps; run the same command again to resume" >&2
        exit 1
    fi
}

best_lr() {  # best_lr SIZE [partial]: the LR whose baseline ends lowest (the paper: tuned for the
    # baseline, reused for TST); "partial" (the report stage) picks among the finished runs only
    best_of "$1-base-lr" "$STEPS" "${2:-all}" $(learning_rates "$1")
}

best_of() {  # best_of PREFIX STEPS all|partial RATE...: the rate whose run PREFIX$RATE ends lowest
    local prefix=$1 steps=$2 which=$3
    shift 3
    if [ "$DRY_RUN" = "1" ]; then
        echo "${2:-$1}"  # a placeholder (the second rate, or the only one): the real value is chosen once the runs are done
        return 0
    fi
    "$PYTHON" - "$RUNS" "$prefix" "$which" "$steps" "$@" <<'PY'
import json, os, sys
runs, prefix, which, steps, rates = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]
def final(rate):
    path = os.path.join(runs, f"{prefix}{rate}", "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    rows = [json.loads(line) for line in open(path)]
    done = [r for r in rows if "validation_loss" in r and r["iteration"] == steps]  # finished runs
    return done[-1]["validation_loss"] if done else None
finals = {rate: final(rate) for rate in rates}
missing = [rate for rate, value in finals.items() if value is None]
if missing and which != "partial":
    sys.exit(f"error: the baselines {' '.join(prefix + rate for rate in missing)} have not run; run their stage first")
present = [rate for rate in rates if finals[rate] is not None]
print(min(present, key=finals.get) if present else "none")
PY
}

neighbours() {  # neighbours SIZE LR: LR and the rates either side of it in the size's sweep
    local rates=($(learning_rates "$1")) i
    for i in "${!rates[@]}"; do
        if [ "${rates[$i]}" = "$2" ]; then
            [ "$i" -eq 0 ] || echo "${rates[$((i - 1))]}"
            echo "$2"
            [ "$((i + 1))" -ge "${#rates[@]}" ] || echo "${rates[$((i + 1))]}"
        fi
    done
}

corpus_fingerprint() {  # corpus_fingerprint DIR: what a corpus rebuilt on another machine is checked against (the
    # text comes from installed packages, whose updates change it; BENCHMARKS.md records the study's)
    local dir=$1
    if [ "$DRY_RUN" = "1" ] || [ ! -f "$dir/corpus_text_document.bin" ] || [ -f "$dir/corpus.fingerprint" ]; then
        return 0
    fi
    { dpkg-query -W -f '${Package} ${Version}\n' python3.11-doc dict-gcide linux-source-6.1 2> /dev/null || true
      "$PYTHON" -c 'import platform; print("python", platform.python_version())'
      (cd "$dir" && sha256sum tokenizer.model corpus_text_document.bin); } > "$dir/corpus.fingerprint"
    echo "[study] corpus: $dir/corpus.fingerprint"
}

stage_corpus() {
    corpus_fingerprint "$STUDY"
    if [ "$DRY_RUN" = "1" ] || [ -f "$DATA.idx" ]; then return 0; fi
    mkdir -p "$STUDY"
    [ -f "$STUDY/corpus.jsonl" ] || "$PYTHON" tools/make_corpus.py --output "$STUDY/corpus.jsonl" \
        --max-bytes "${CORPUS_BYTES:-400000000}" --sources "${CORPUS_SOURCES:-stdlib,python-doc,gcide}"
    [ -f "$TOKENIZER" ] || "$PYTHON" tools/train_tokenizer.py --input "$STUDY/corpus.jsonl" \
        --output-prefix "$STUDY/tokenizer" --vocab-size 4096 --max-bytes "${TOKENIZER_BYTES:-20000000}"
    "$PYTHON" tools/preprocess_data.py --input "$STUDY/corpus.jsonl" --output-prefix "$STUDY/corpus" \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER" --append-eod --workers "${WORKERS:-2}"
    corpus_fingerprint "$STUDY"
}

stage_lr() {
    local size lr
    for size in $SIZES; do
        for lr in $(learning_rates "$size"); do
            run "$size-base-lr$lr" "$size" "$lr" "$STEPS"
        done
    done
}

stage_size() {
    local size lr
    for size in $SIZES; do
        lr=$(best_lr "$size")
        run "$size-tst-s4-r0.3-lr$lr" "$size" "$lr" "$STEPS" --tst-bag-size 4 --tst-ratio 0.3
    done
    case " $SIZES " in *" M "*) ;; *) return 0 ;; esac
    lr=$(best_lr M)  # tied embeddings at M (input embedding = output head), against the untied runs
    TIED=1 run "M-tied-base" M "$lr" "$STEPS"
    TIED=1 run "M-tied-tst-s4-r0.3" M "$lr" "$STEPS" --tst-bag-size 4 --tst-ratio 0.3
}

stage_steps() {  # gap vs training length at S, the lr tuned at T (the paper's gain shrinks with T)
    local lr t
    lr=$(best_lr S)
    for t in $T_SWEEP; do
        run "S-T$t-base-lr$lr" S "$lr" "$t"
        run "S-T$t-tst-s4-r0.3-lr$lr" S "$lr" "$t" --tst-bag-size 4 --tst-ratio 0.3
    done
}

stage_long() {  # where TST wins at S (T=$T_LONG): the baseline's lr rechecked at that length,
    # then the ablations and s in {2,8} at the best of those rates, read against TST s=4 r=0.3
    local lr t=$T_LONG rates rate
    lr=$(best_lr S)
    rates=$(neighbours S "$lr")
    for rate in $rates; do
        run "S-T$t-base-lr$rate" S "$rate" "$t"
    done
    local long_lr
    long_lr=$(best_of "S-T$t-base-lr" "$t" all $rates)
    [ "$long_lr" = "$lr" ] || run "S-T$t-tst-s4-r0.3-lr$long_lr" S "$long_lr" "$t" --tst-bag-size 4 --tst-ratio 0.3
    run "S-T$((2 * t))-base-lr$long_lr" S "$long_lr" $((2 * t))  # 2T: the iso-loss step ratio where TST wins
    run "S-T$t-input-only-s4-r0.3-lr$long_lr" S "$long_lr" "$t" --tst-bag-size 4 --tst-ratio 0.3 --tst-mode input-only
    run "S-T$t-output-only-s4-r0.3-lr$long_lr" S "$long_lr" "$t" --tst-bag-size 4 --tst-ratio 0.3 --tst-mode output-only
    run "S-T$t-reinit-s4-r0.3-lr$long_lr" S "$long_lr" "$t" --tst-bag-size 4 --tst-ratio 0.3 --reinit-embeddings-at-switch
    run "S-T$t-tst-s2-r0.3-lr$long_lr" S "$long_lr" "$t" --tst-bag-size 2 --tst-ratio 0.3
    run "S-T$t-tst-s8-r0.3-lr$long_lr" S "$long_lr" "$t" --tst-bag-size 8 --tst-ratio 0.3
    # a second seed (initialisation and data order) of the headline pair: is the gap above the noise?
    run "S-T$t-base-lr$long_lr-seed2" S "$long_lr" "$t" --seed 2345
    run "S-T$t-tst-s4-r0.3-lr$long_lr-seed2" S "$long_lr" "$t" --tst-bag-size 4 --tst-ratio 0.3 --seed 2345
}

stage_grid() {
    local lr s r
    lr=$(best_lr L)
    # the ablations first: each is read against the size stage's TST s=4 r=0.3 run
    run "L-input-only-s4-r0.3" L "$lr" "$STEPS" --tst-bag-size 4 --tst-ratio 0.3 --tst-mode input-only
    run "L-output-only-s4-r0.3" L "$lr" "$STEPS" --tst-bag-size 4 --tst-ratio 0.3 --tst-mode output-only
    run "L-reinit-s4-r0.3" L "$lr" "$STEPS" --tst-bag-size 4 --tst-ratio 0.3 --reinit-embeddings-at-switch
    for s in 2 4 8; do
        for r in 0.2 0.4; do
            run "L-tst-s$s-r$r" L "$lr" "$STEPS" --tst-bag-size "$s" --tst-ratio "$r"
        done
    done
    run "L-power-s8-r0.4" L "$lr" "$STEPS" --tst-bag-size 8 --tst-ratio 0.4 --tst-loss-weighting power
    run "L-base-2T" L "$lr" $((2 * STEPS))
}

stage_crossover() {
    local lr
    lr=$(best_lr M)
    run "M-T$T_LONG-base-lr$lr" M "$lr" "$T_LONG"
    run "M-T$T_LONG-tst-s4-r0.3-lr$lr" M "$lr" "$T_LONG" --tst-bag-size 4 --tst-ratio 0.3
}

batch_rates() {  # the S baseline sweep at 4x the tokens per step (larger batches take larger rates)
    echo "1e-3 2e-3 4e-3"
}

b64_best() {  # b64_best T: the batch-64 baseline rate that ended lowest at length T among the finished runs
    # (the sweep's rates and the edge runs, where they ran); B64_LR sets T=2000's (2e-3 in BENCHMARKS.md) for
    # a study folder without the sweep's runs
    if [ "$1" = "2000" ] && [ -n "${B64_LR:-}" ]; then echo "$B64_LR"; return 0; fi
    best_of "S-B64-T$1-base-lr" "$1" partial $(batch_rates) 5e-4 8e-3
}

b64() {  # b64 NAME SIZE LR T [flags...]: run at global batch 64 in four micro-batches of 16 (the batch-16
    # runs' validation samples), warm-up and evaluations every T/20 steps
    GLOBAL_BATCH=64 WARMUP=${WARMUP:-$(($4 / 20))} run "$@"
}

stage_batch() {  # steps or tokens? S with global batch 64 at T=500 and 2000 (the tokens, and FLOPs, of batch 16
    # at T=2000 and 8000): the baseline's lr tuned at each length (extended past an edge), TST s=4 r=0.3 at the
    # best, and at T=2000 baselines of T/2 and 2T for the iso-loss ratio (baselines by length)
    local t rate lr rates edge
    # batch 16 at T=2000 again (S's rate): the batch-16 side of the comparison with today's code
    run "S-base-lr1e-3" S 1e-3 "$STEPS"
    run "S-tst-s4-r0.3-lr1e-3" S 1e-3 "$STEPS" --tst-bag-size 4 --tst-ratio 0.3
    for t in 500 2000; do
        rates=$(batch_rates) edge=""
        for rate in $rates; do
            b64 "S-B64-T$t-base-lr$rate" S "$rate" "$t"
        done
        if [ -n "${RUN_FILTER:-}" ] && ! [[ "S-B64-T$t-tst-s4-r0.3-lr" =~ $RUN_FILTER ]]; then continue; fi  # another lane's
        lr=$(best_of "S-B64-T$t-base-lr" "$t" all $rates)
        [ "$lr" = "$(echo $rates | cut -d' ' -f1)" ] && edge=5e-4
        [ "$lr" = "$(echo $rates | awk '{print $NF}')" ] && edge=8e-3
        if [ -n "$edge" ] && [ "$DRY_RUN" != "1" ]; then  # the best rate at an edge: one more beyond it
            b64 "S-B64-T$t-base-lr$edge" S "$edge" "$t"
            lr=$(best_of "S-B64-T$t-base-lr" "$t" all $rates $edge)
        fi
        b64 "S-B64-T$t-tst-s4-r0.3-lr$lr" S "$lr" "$t" --tst-bag-size 4 --tst-ratio 0.3
    done
    if [ -n "${RUN_FILTER:-}" ] && ! [[ "S-B64-T1000-base-lr" =~ $RUN_FILTER || "S-B64-T4000-base-lr" =~ $RUN_FILTER ]]; then
        return 0
    fi
    lr=$(b64_best 2000)
    for t in 1000 4000; do  # the length ladder at T=2000's rate and warm-up: the runs differ in length only
        WARMUP=100 b64 "S-B64-T$t-base-lr$lr" S "$lr" "$t"
    done
}

LONG_LR=${LONG_LR:-1e-3}  # S's rate at T=$T_LONG: the long stage's check picked it (BENCHMARKS.md); the stages
# below use it directly so that they run in a study folder without the long stage's runs
SEEDS=(1234 2345 3456 4567 5678)  # the first two are the long stage's runs (no suffix, and -seed2)

seed_suffix() {  # seed_suffix INDEX: "" for the first seed, -seedN for the N-th
    [ "$1" -eq 0 ] || echo "-seed$(($1 + 1))"
}

seed_args() {  # seed_args INDEX: nothing for the first seed (run's default, so a run keeps one command), else --seed
    [ "$1" -eq 0 ] || echo "--seed ${SEEDS[$1]}"
}

stage_seeds() {  # a confidence interval on the win: the winning pair (S, T=$T_LONG, s=4 r=0.3) at five seeds;
    # with B64_SEEDS=1 also batch 64 at T=2000 (point 2 of issue 22, when TST wins there)
    local i suffix lr
    for i in "${!SEEDS[@]}"; do
        suffix=$(seed_suffix "$i")
        run "S-T$T_LONG-base-lr$LONG_LR$suffix" S "$LONG_LR" "$T_LONG" $(seed_args "$i")
        run "S-T$T_LONG-tst-s4-r0.3-lr$LONG_LR$suffix" S "$LONG_LR" "$T_LONG" --tst-bag-size 4 --tst-ratio 0.3 \
            $(seed_args "$i")
    done
    [ "${B64_SEEDS:-0}" = "1" ] || return 0
    lr=$(b64_best 2000)
    for i in "${!SEEDS[@]}"; do
        suffix=$(seed_suffix "$i")
        b64 "S-B64-T2000-base-lr$lr$suffix" S "$lr" 2000 $(seed_args "$i")
        b64 "S-B64-T2000-tst-s4-r0.3-lr$lr$suffix" S "$lr" 2000 --tst-bag-size 4 --tst-ratio 0.3 $(seed_args "$i")
    done
}

stage_sr() {  # a rule for s and r where TST wins (S, T=$T_LONG): s in {2,3,4,6} x r in {0.2,0.3,0.4}, one seed
    local s r
    for s in 2 3 4 6; do
        for r in 0.2 0.3 0.4; do
            run "S-T$T_LONG-tst-s$s-r$r-lr$LONG_LR" S "$LONG_LR" "$T_LONG" --tst-bag-size "$s" --tst-ratio "$r"
        done
    done
    # the best cell again at the second and third seeds, beside those seeds' baseline and s=4 r=0.3 (the seeds
    # stage's runs): is its lead over s=4 r=0.3 the seed's?
    local i
    s=${SR_BEST%:*} r=${SR_BEST#*:}
    for i in 1 2; do
        run "S-T$T_LONG-base-lr$LONG_LR$(seed_suffix "$i")" S "$LONG_LR" "$T_LONG" $(seed_args "$i")
        run "S-T$T_LONG-tst-s4-r0.3-lr$LONG_LR$(seed_suffix "$i")" S "$LONG_LR" "$T_LONG" --tst-bag-size 4 \
            --tst-ratio 0.3 $(seed_args "$i")
        run "S-T$T_LONG-tst-s$s-r$r-lr$LONG_LR$(seed_suffix "$i")" S "$LONG_LR" "$T_LONG" --tst-bag-size "$s" \
            --tst-ratio "$r" $(seed_args "$i")
    done
}
SR_BEST=${SR_BEST:-4:0.2}  # s:r, the cell of the grid with the lowest final loss (BENCHMARKS.md)

CORPUS2="$STUDY/linux"  # a second corpus of another kind: Linux kernel sources (C, build files, docs)

linux_best() {  # the second corpus's baseline rate that ended lowest at T_LONG among the finished runs (the
    # neighbours of $LONG_LR, and the rate below them where it ran)
    best_of "linux-S-T$T_LONG-base-lr" "$T_LONG" partial $(neighbours S "$LONG_LR") 2.5e-4
}

stage_corpus2() {  # the winning pair on the second corpus, its own 4096-piece tokenizer, two seeds, and the
    # baseline's rate rechecked there (the neighbours of $LONG_LR, first seed; past the low edge where the
    # lowest wins, and TST at the best rate)
    if [ "$DRY_RUN" != "1" ] && [ ! -f "$CORPUS2/corpus_text_document.idx" ]; then
        mkdir -p "$CORPUS2"
        [ -f "$CORPUS2/corpus.jsonl" ] || "$PYTHON" tools/make_corpus.py --sources linux \
            --output "$CORPUS2/corpus.jsonl" --max-bytes "${CORPUS2_BYTES:-120000000}"
        [ -f "$CORPUS2/tokenizer.model" ] || "$PYTHON" tools/train_tokenizer.py --input "$CORPUS2/corpus.jsonl" \
            --output-prefix "$CORPUS2/tokenizer" --vocab-size 4096 --max-bytes "${TOKENIZER_BYTES:-20000000}"
        "$PYTHON" tools/preprocess_data.py --input "$CORPUS2/corpus.jsonl" --output-prefix "$CORPUS2/corpus" \
            --tokenizer-type SentencePieceTokenizer --tokenizer-model "$CORPUS2/tokenizer.model" --append-eod \
            --workers "${WORKERS:-2}"
    fi
    corpus_fingerprint "$CORPUS2"
    local i suffix rate rates best
    rates=$(neighbours S "$LONG_LR")
    for rate in $rates; do
        DATA="$CORPUS2/corpus_text_document" TOKENIZER="$CORPUS2/tokenizer.model" \
            run "linux-S-T$T_LONG-base-lr$rate" S "$rate" "$T_LONG"
    done
    # the best of them at the low edge: one rate below it; TST (first seed) at the best where it is not $LONG_LR
    best=$(linux_best)
    if [ "$best" = "$(echo $rates | cut -d' ' -f1)" ] && [ "$DRY_RUN" != "1" ]; then
        DATA="$CORPUS2/corpus_text_document" TOKENIZER="$CORPUS2/tokenizer.model" \
            run "linux-S-T$T_LONG-base-lr2.5e-4" S 2.5e-4 "$T_LONG"
        best=$(linux_best)
    fi
    if [ "$best" != "$LONG_LR" ] && [ "$best" != "none" ]; then
        DATA="$CORPUS2/corpus_text_document" TOKENIZER="$CORPUS2/tokenizer.model" \
            run "linux-S-T$T_LONG-tst-s4-r0.3-lr$best" S "$best" "$T_LONG" --tst-bag-size 4 --tst-ratio 0.3
    fi
    for i in 0 1; do
        suffix=$(seed_suffix "$i")
        DATA="$CORPUS2/corpus_text_document" TOKENIZER="$CORPUS2/tokenizer.model" \
            run "linux-S-T$T_LONG-base-lr$LONG_LR$suffix" S "$LONG_LR" "$T_LONG" $(seed_args "$i")
        DATA="$CORPUS2/corpus_text_document" TOKENIZER="$CORPUS2/tokenizer.model" \
            run "linux-S-T$T_LONG-tst-s4-r0.3-lr$LONG_LR$suffix" S "$LONG_LR" "$T_LONG" --tst-bag-size 4 \
            --tst-ratio 0.3 $(seed_args "$i")
    done
}

report() {  # report NAME RUN... --baseline RUN [--baselines-by-length RUN...]  (a partial study:
    # missing TST runs are left out; the length ladder is given when two or more of it have run)
    local name=$1 runs=() baseline="" missing=() ladder=() by_length=() run_dir
    shift
    while [ $# -gt 0 ]; do
        if [ "$1" = "--baseline" ]; then baseline=$2; shift 2; continue; fi
        if [ "$1" = "--baselines-by-length" ]; then
            shift
            for run_dir in "$@"; do
                [ "$DRY_RUN" != "1" ] && [ ! -f "$run_dir/metrics.jsonl" ] || ladder+=("$run_dir")
            done
            break
        fi
        if [ "$DRY_RUN" = "1" ] || [ -f "$1/metrics.jsonl" ] || [ -f "$1/recovery/metrics.jsonl" ] \
            || [ -f "$1/superposition/metrics.jsonl" ]; then runs+=("$1"); else missing+=("$(basename "$1")"); fi
        shift
    done
    [ ${#ladder[@]} -lt 2 ] || by_length=(--baselines-by-length "${ladder[@]}")
    if [ "$DRY_RUN" = "1" ]; then
        echo "$PYTHON tools/tst_report.py ${runs[*]} --baseline $baseline ${by_length[*]} --output $STUDY/reports/$name"
        return 0
    fi
    if [ ! -f "$baseline/metrics.jsonl" ] || [ ${#runs[@]} -eq 0 ]; then
        echo "[study] report $name: skipped (baseline or every run not there yet)"
        return 0
    fi
    [ ${#missing[@]} -eq 0 ] || echo "[study] report $name: without ${missing[*]} (not run yet)"
    "$PYTHON" tools/tst_report.py "${runs[@]}" --baseline "$baseline" ${by_length[@]+"${by_length[@]}"} \
        --output "$STUDY/reports/$name" > /dev/null
    echo "[study] report: $STUDY/reports/$name/report.md"
}

gpu_rates() {  # the gpu stage's rates per size: the CPU study's best at L (5e-4, 2.5e-4 tied) and the two
    # lowest of the L sweep one size up (larger models want lower rates)
    case "$1" in L) echo "5e-4" ;; XL) echo "2.5e-4 5e-4" ;; esac
}

stage_gpu() {  # one size up, on one GPU: baselines and TST s=4 r=0.3 at L and XL, every rate of
    # gpu_rates for both, all at once (steps this small leave the GPU idle between kernels), so TST at
    # the best baseline rate exists without a second pass; each run's output in $STUDY/logs/NAME.log
    local size lr name pid pids=() failed=0
    mkdir -p "$STUDY/logs"
    for size in $GPU_SIZES; do
        for lr in $(gpu_rates "$size"); do
            for name in "$size-base-lr$lr" "$size-tst-s4-r0.3-lr$lr"; do
                local tst=()
                [[ $name == *-tst-* ]] && tst=(--tst-bag-size 4 --tst-ratio 0.3)
                if [ "$DRY_RUN" = "1" ]; then run "$name" "$size" "$lr" "$STEPS" ${tst[@]+"${tst[@]}"}; continue; fi
                run "$name" "$size" "$lr" "$STEPS" ${tst[@]+"${tst[@]}"} > "$STUDY/logs/$name.log" 2>&1 &
                pids+=($!)
            done
        done
    done
    for pid in ${pids[@]+"${pids[@]}"}; do wait "$pid" || failed=1; done
    [ "$failed" = "0" ] || { echo "[study] gpu: a run failed or stopped early; see $STUDY/logs" >&2; return 1; }
}

stage_gpu_report() {  # the gpu stage's comparisons: each size at its best baseline rate, and the gap plot
    local size lr triples=()
    for size in $GPU_SIZES; do
        lr=$(best_of "$size-base-lr" "$STEPS" partial $(gpu_rates "$size"))
        report "gpu-size-$size" "$RUNS/$size-tst-s4-r0.3-lr$lr" --baseline "$RUNS/$size-base-lr$lr"
        if [ -f "$RUNS/$size-base-lr$lr/metrics.jsonl" ] && [ -d "$RUNS/$size-tst-s4-r0.3-lr$lr" ]; then
            triples+=("$size:$RUNS/$size-base-lr$lr:$RUNS/$size-tst-s4-r0.3-lr$lr")
        fi
    done
    if [ "$DRY_RUN" != "1" ] && [ ${#triples[@]} -gt 0 ]; then
        "$PYTHON" examples/repro/gap_vs_size.py "$STUDY" "${triples[@]}"
    fi
}

pairs_report() {  # pairs_report NAME CONFIG STEPS BASELINE TST [CONFIG STEPS BASELINE TST...]: tst_report --pair,
    # the pairs whose two runs have finished their STEPS (seeds and configurations still running are left out, and named)
    local name=$1 args=() missing=()
    shift
    while [ $# -ge 4 ]; do
        if [ "$DRY_RUN" = "1" ] || { finished "$3" "$2" && finished "$4" "$2"; }; then
            args+=(--pair "$1" "$3" "$4")
        else
            missing+=("$(basename "$4")")
        fi
        shift 4
    done
    if [ "$DRY_RUN" = "1" ]; then
        printf '%q ' "$PYTHON" tools/tst_report.py "${args[@]}" --output "$STUDY/reports/$name"
        echo
        return 0
    fi
    [ ${#args[@]} -gt 0 ] || { echo "[study] report $name: skipped (no pair has run yet)"; return 0; }
    [ ${#missing[@]} -eq 0 ] || echo "[study] report $name: without ${missing[*]} (not finished)"
    "$PYTHON" tools/tst_report.py "${args[@]}" --output "$STUDY/reports/$name" > /dev/null
    echo "[study] report: $STUDY/reports/$name/report.md"
}

report_part2() {  # issue 22's comparisons: batch 64, the seeds, the s x r grid, the second corpus
    local t lr i suffix pairs=() s r grid=()
    for t in 500 2000; do
        lr=$(b64_best "$t")
        report "batch-S-B64-T$t" "$RUNS/S-B64-T$t-tst-s4-r0.3-lr$lr" --baseline "$RUNS/S-B64-T$t-base-lr$lr" \
            --baselines-by-length "$RUNS/S-B64-T500-base-lr$lr" "$RUNS/S-B64-T1000-base-lr$lr" \
            "$RUNS/S-B64-T2000-base-lr$lr" "$RUNS/S-B64-T4000-base-lr$lr"
    done
    # steps or tokens: the four configurations side by side (batch 16 and 64, equal tokens across the diagonal)
    local b500 b2000
    b500=$(b64_best 500)
    b2000=$(b64_best 2000)
    pairs_report "steps-or-tokens" \
        "b16 T=2000 (2M tokens)" "$STEPS" "$RUNS/S-base-lr1e-3" "$RUNS/S-tst-s4-r0.3-lr1e-3" \
        "b64 T=500 (2M tokens)" 500 "$RUNS/S-B64-T500-base-lr$b500" "$RUNS/S-B64-T500-tst-s4-r0.3-lr$b500" \
        "b16 T=$T_LONG (8M tokens)" "$T_LONG" "$RUNS/S-T$T_LONG-base-lr$LONG_LR" "$RUNS/S-T$T_LONG-tst-s4-r0.3-lr$LONG_LR" \
        "b64 T=2000 (8M tokens)" 2000 "$RUNS/S-B64-T2000-base-lr$b2000" "$RUNS/S-B64-T2000-tst-s4-r0.3-lr$b2000"
    for i in "${!SEEDS[@]}"; do
        suffix=$(seed_suffix "$i")
        pairs+=("S b16 T=$T_LONG s=4 r=0.3" "$T_LONG" "$RUNS/S-T$T_LONG-base-lr$LONG_LR$suffix" "$RUNS/S-T$T_LONG-tst-s4-r0.3-lr$LONG_LR$suffix")
    done
    lr=$(b64_best 2000)
    for i in "${!SEEDS[@]}"; do
        suffix=$(seed_suffix "$i")
        pairs+=("S b64 T=2000 s=4 r=0.3" 2000 "$RUNS/S-B64-T2000-base-lr$lr$suffix" "$RUNS/S-B64-T2000-tst-s4-r0.3-lr$lr$suffix")
    done
    for i in 0 1; do
        suffix=$(seed_suffix "$i")
        pairs+=("linux S b16 T=$T_LONG s=4 r=0.3" "$T_LONG" "$RUNS/linux-S-T$T_LONG-base-lr$LONG_LR$suffix"
                "$RUNS/linux-S-T$T_LONG-tst-s4-r0.3-lr$LONG_LR$suffix")
    done
    s=${SR_BEST%:*} r=${SR_BEST#*:}
    for i in 0 1 2; do
        suffix=$(seed_suffix "$i")
        pairs+=("S b16 T=$T_LONG s=$s r=$r" "$T_LONG" "$RUNS/S-T$T_LONG-base-lr$LONG_LR$suffix"
                "$RUNS/S-T$T_LONG-tst-s$s-r$r-lr$LONG_LR$suffix")
    done
    pairs_report "seeds" "${pairs[@]}"
    lr=$(linux_best)
    if [ "$lr" != "$LONG_LR" ] && [ "$lr" != "none" ]; then  # the second corpus's pair at its baseline's best rate
        report "linux-S-T$T_LONG-lr$lr" "$RUNS/linux-S-T$T_LONG-tst-s4-r0.3-lr$lr" \
            --baseline "$RUNS/linux-S-T$T_LONG-base-lr$lr"
    fi
    for s in 2 3 4 6; do for r in 0.2 0.3 0.4; do grid+=("$RUNS/S-T$T_LONG-tst-s$s-r$r-lr$LONG_LR"); done; done
    report "sr-S-T$T_LONG" "${grid[@]}" --baseline "$RUNS/S-T$T_LONG-base-lr$LONG_LR"
}

stage_report() {  # works on a partial study: what has not run yet is left out, and said so
    local size base lr run_name t triples=()
    for size in S M L; do
        lr=$(best_lr "$size" partial)
        report "size-$size" "$RUNS/$size-tst-s4-r0.3-lr$lr" --baseline "$RUNS/$size-base-lr$lr"
        if [ -f "$RUNS/$size-base-lr$lr/metrics.jsonl" ] && [ -d "$RUNS/$size-tst-s4-r0.3-lr$lr" ]; then
            triples+=("$size:$RUNS/$size-base-lr$lr:$RUNS/$size-tst-s4-r0.3-lr$lr")
        fi
    done
    report "tied-M" "$RUNS/M-tied-tst-s4-r0.3" --baseline "$RUNS/M-tied-base"
    lr=$(best_lr S partial)
    for t in $T_SWEEP; do
        report "steps-S-T$t" "$RUNS/S-T$t-tst-s4-r0.3-lr$lr" --baseline "$RUNS/S-T$t-base-lr$lr"
    done
    local long_lr long=()
    long_lr=$(best_of "S-T$T_LONG-base-lr" "$T_LONG" partial $(neighbours S "$lr"))
    for run_name in tst-s4-r0.3 input-only-s4-r0.3 output-only-s4-r0.3 reinit-s4-r0.3 tst-s2-r0.3 tst-s8-r0.3; do
        long+=("$RUNS/S-T$T_LONG-$run_name-lr$long_lr")
    done
    report "long-S-T$T_LONG" "${long[@]}" --baseline "$RUNS/S-T$T_LONG-base-lr$long_lr"  # where TST wins
    report "seed2-S-T$T_LONG" "$RUNS/S-T$T_LONG-tst-s4-r0.3-lr$long_lr-seed2" \
        --baseline "$RUNS/S-T$T_LONG-base-lr$long_lr-seed2"
    local ladder=("$RUNS/S-base-lr$long_lr")  # baselines of every length, each decayed at its end
    for t in $T_SWEEP $((2 * T_LONG)); do ladder+=("$RUNS/S-T$t-base-lr$long_lr"); done
    report "iso-loss-S-T$T_LONG" "${long[@]}" "$RUNS/S-T$T_LONG-base-lr$long_lr" \
        --baseline "$RUNS/S-T$((2 * T_LONG))-base-lr$long_lr" --baselines-by-length "${ladder[@]}"
    lr=$(best_lr L partial)
    base="$RUNS/L-base-lr$lr"
    local grid=("$RUNS/L-tst-s4-r0.3-lr$lr") s r
    for s in 2 4 8; do for r in 0.2 0.4; do grid+=("$RUNS/L-tst-s$s-r$r"); done; done
    grid+=("$RUNS/L-input-only-s4-r0.3" "$RUNS/L-output-only-s4-r0.3" "$RUNS/L-reinit-s4-r0.3"
           "$RUNS/L-power-s8-r0.4")
    report "grid-L" "${grid[@]}" --baseline "$base"                   # equal steps (equal FLOPs)
    report "iso-loss-L" "${grid[@]}" "$base" --baseline "$RUNS/L-base-2T" \
        --baselines-by-length "$base" "$RUNS/L-base-2T"  # the baseline trained T and 2T
    lr=$(best_lr M partial)
    report "long-M-T$T_LONG" "$RUNS/M-T$T_LONG-tst-s4-r0.3-lr$lr" --baseline "$RUNS/M-T$T_LONG-base-lr$lr"
    if [ "$DRY_RUN" = "1" ]; then
        echo "$PYTHON examples/repro/gap_vs_size.py $STUDY SIZE:BASELINE:TST..."
    elif [ ${#triples[@]} -gt 0 ]; then
        "$PYTHON" examples/repro/gap_vs_size.py "$STUDY" "${triples[@]}"
    fi
    report_part2
}

STAGES=("$@")
[ ${#STAGES[@]} -gt 0 ] || STAGES=(corpus lr size steps long grid crossover batch seeds sr corpus2 report)
for stage in "${STAGES[@]}"; do
    case "$stage" in
        corpus|lr|size|steps|long|grid|crossover|batch|seeds|sr|corpus2|report|gpu|gpu_report) "stage_$stage" ;;
        *) echo "error: unknown stage $stage (corpus, lr, size, steps, long, grid, crossover, batch, seeds, sr, corpus2, report, gpu, gpu_report)" >&2
           exit 2 ;;
    esac
done
