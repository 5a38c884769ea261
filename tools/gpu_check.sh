#!/usr/bin/env bash
# One command that checks the GPU path on a single-GPU machine with Python and torch but without
# megatron-core (the usual bare GPU box):
#   1. installs what is missing from the wheels in WHEEL_DIR (default .whl/, made by
#      tools/fetch_gpu_wheels.sh on a machine with PyPI access) into a private folder; no network;
#   2. runs the GPU tests (pytest -m gpu) and the TE tests;
#   3. runs the GPU benchmark (examples/bench_gpu.py, with --profile) and, where transformers is
#      installed, the peer benchmark (examples/bench_peer.py, ours with and without megatron-core's
#      compiled fusions).
# Everything they print goes to OUTDIR (gpu_tests.log, bench_gpu.log/.json, bench_peer.log/.json,
# environment.txt).
# Usage: tools/gpu_check.sh OUTDIR [WHEEL_DIR]
set -uo pipefail
if [ $# -lt 1 ]; then
  echo "usage: tools/gpu_check.sh OUTDIR [WHEEL_DIR]" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "$1" && cd "$1" && pwd)
wheels=${2:-$root/.whl}
python=${PYTHON:-python3}
cd "$root"

if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: torch sees no CUDA GPU here; run tools/gpu_check.sh on a GPU machine" >&2
  exit 1
fi
if ! "$python" -c "import megatron.core" 2>/dev/null; then
  if ! ls "$wheels"/megatron_core-0.16.1-*.whl >/dev/null 2>&1; then
    echo "error: megatron-core is not installed and no megatron_core-0.16.1 wheel is in $wheels;" \
         "run tools/fetch_gpu_wheels.sh where PyPI is reachable and bring $wheels along" >&2
    exit 1
  fi
  site=$(mktemp -d /tmp/megatron_tst_site.XXXXXX)
  "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    "$wheels"/*.whl || { echo "error: installing the wheels in $wheels failed" >&2; exit 1; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  "$python" -c "import sys, torch, megatron.core as m; print(sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'megatron-core', m.__version__, torch.cuda.get_device_name(0), \
'capability', torch.cuda.get_device_capability(0))"
  "$python" -c "import transformer_engine as te; print('transformer-engine', te.__version__)" 2>/dev/null \
    || echo "transformer-engine: not installed (TE tests skip)"
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"

status=0
"$python" -m pytest -q -m gpu -p no:cacheprovider -rs tests/test_gpu.py tests/test_gpu_fast_step.py tests/test_gpu_loss_kernels.py tests/test_te.py 2>&1 | tee "$out/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
"$python" examples/bench_gpu.py --profile --output "$out/bench_gpu.json" 2>&1 | tee "$out/bench_gpu.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
# ours against transformers' LlamaForCausalLM at the same shape (needs transformers; not in the wheels)
if "$python" -c "import transformers" 2>/dev/null; then
  "$python" examples/bench_peer.py --seq-length 2048 --fusions compare --output "$out/bench_peer.json" 2>&1 | tee "$out/bench_peer.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
  echo "bench_peer: transformers is not installed here; skipped" | tee "$out/bench_peer.log"
fi
echo "gpu_check: $( [ $status -eq 0 ] && echo passed || echo FAILED ); logs in $out"
exit $status
