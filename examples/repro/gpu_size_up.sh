#!/usr/bin/env bash
# The study one size up, on one GPU (issue 10): a corpus built there from the installed packages'
# Python sources (a bare GPU box holds little other text), the study's 4096-piece tokenizer recipe,
# then L (14.2M non-embedding parameters, the CPU study's largest) and XL (33.6M): baselines and TST
# s=4 r=0.3 at T=2000 with the CPU study's settings, every run at once (study.sh stages gpu and
# gpu_report), and the reports with the gap-vs-size table. Resumable like the study.
#   bash examples/repro/gpu_size_up.sh [STUDY_DIR]        (default runs/gpu-study)
# The L pair anchors the comparison: the corpus differs from the CPU study's, so XL is read against
# L on this corpus, not against the CPU study's numbers.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export STUDY=${1:-${STUDY:-runs/gpu-study}}
export CORPUS_SOURCES=packages CORPUS_BYTES=${CORPUS_BYTES:-60000000} TOKENIZER_BYTES=${TOKENIZER_BYTES:-8000000}
export WORKERS=${WORKERS:-$(nproc)} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHON=${PYTHON:-python3}
bash examples/repro/study.sh corpus gpu gpu_report
