#!/usr/bin/env bash
# The paper's longer 270M run (Table 1, Table 5): 100000 steps of 2M tokens, s=6, r=0.3 (30000 TST
# steps, 377B TST tokens + 147B recovery tokens), peak LR 2e-3; WSD decay over the last 10000 steps.
# Everything else, and which values are the paper's, as in pretrain_tst_dense.sh.
#   DATA_PATH=... TOKENIZER_MODEL=... CHECKPOINT_DIR=... bash examples/pretrain_tst_270m_100k.sh
#   BASELINE=1 ... for the matched 100000-step baseline (209B tokens).
MODEL=270M TRAIN_ITERS=100000 exec bash "$(dirname "${BASH_SOURCE[0]}")/pretrain_tst_dense.sh" "$@"
