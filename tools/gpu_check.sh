#!/usr/bin/env bash
# The one prepared GPU run: every GPU figure the open issues (19, 20) ask for, and the GPU tests, on
# a bare single-GPU box (Python + torch + triton + transformers, no megatron-core, no network) in at
# most GPU_CHECK_BUDGET_S seconds (default 540: 9 minutes), most important first.
#
# The device tool's call (one call; the machine's start, a few minutes, comes on top):
#   first, here:  bash tools/fetch_gpu_wheels.sh        # .whl/: megatron-core 0.16.1's cp312 wheel, 2.5 MB
#   run(command="bash tools/gpu_check.sh $OUT/gpu", carry=[".whl"], timeout_s=600)
# Then paste $OUT/gpu/summary.md (targets, measured values, pass/fail) into BENCHMARKS.md; the
# logs and JSON of every step lie beside it.
#
# Steps, each in its own process under its own time limit (min(its ceiling, what is left of the
# budget); a step that would start with under 20 s left is skipped), each writing to OUTDIR as it
# goes, and tools/gpu_summary.py rewriting OUTDIR/summary.{md,json} after each (a run cut short
# returns what it measured). Expected times are estimates (no GPU was lent when this was written):
# the H200's 270M step took 382 ms with the old attention, imports ~10 s a process, the first
# Triton compiles ~20-60 s a process (later processes reuse the on-disk cache). [ceiling]
#   headline     270M, seq 2048, bf16, 4x2: baseline / TST next-token / TST phase-1 (s=6) interleaved,
#                each one's peak alone, the baseline with --attention-backend local, the loss kernels
#                at V=128256, N=8192, s in {1, 6, 16}; then the top kernels of one baseline and one
#                TST step and the layouts 4x2 vs 8x1 (examples/bench_gpu.py)          ~2-3 min [300 s]
#   linear       fused output layer + MCE against output GEMM + fused CE / today's MCE, V=128256,
#                N=8192, H=1024, s in {1, 16} (examples/bench_mce.py --linear)          ~40 s [90 s]
#   tests-fast   pytest -m gpu: tests/test_gpu_fast_step.py, tests/test_gpu_loss_kernels.py ~90 s [150 s]
#   fusion       --output-layer-loss-fusion off/on at micro-batch 4 and 8 (time, peak)  ~80 s [120 s]
#   peer         ours against transformers' LlamaForCausalLM (sdpa), the 270M shape, mb 4 ~80 s [120 s]
#   3b           the 3B preset: MFU (micro-batch 2 x 4 on >= 120 GiB, else 1 x 8; out of memory:
#                again at 1 x 8 with full recomputation)                                ~60 s [150 s]
#   linear-main-grad  the linear comparison with DDP's fp32 main_grad (as pretrain trains) ~30 s [60 s]
#   tests-rest   pytest -m gpu: tests/test_gpu.py but the launcher, tests/test_te.py (skip without TE) [150 s]
#   tests-launcher  the launcher's two-phase bf16 run with a SIGTERM resume (minutes)  [what is left]
# The budget most likely ends during the last two; with device time to spare, a second call
# (GPU_CHECK_ONLY="tests-rest tests-launcher", OUTDIR another folder) runs them.
#
# Usage: tools/gpu_check.sh OUTDIR [WHEEL_DIR]
#   GPU_CHECK_BUDGET_S=540   the wall-time budget of all steps, in seconds
#   GPU_CHECK_ONLY="headline linear"   run only these steps (and the summary)
#   GPU_CHECK_DRY_RUN=1      the same sequence at tiny shapes on a CPU (no GPU needed; megatron-core
#                            installed), to check the script: a few minutes on 2 cores
#   PYTHON=python3           the interpreter
set -uo pipefail
if [ $# -lt 1 ]; then
  echo "usage: tools/gpu_check.sh OUTDIR [WHEEL_DIR]" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "$1" && cd "$1" && pwd)
wheels=${2:-$root/.whl}
python=${PYTHON:-python3}
dry=${GPU_CHECK_DRY_RUN:-0}
budget=${GPU_CHECK_BUDGET_S:-540}
only=${GPU_CHECK_ONLY:-}
cd "$root"
started=$SECONDS

if [ "$dry" != 1 ] && ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: torch sees no CUDA GPU here; run tools/gpu_check.sh on a GPU machine (or GPU_CHECK_DRY_RUN=1" \
       "to check the script on a CPU)" >&2
  exit 1
fi
if ! "$python" -c "import megatron.core" 2>/dev/null; then
  if ! ls "$wheels"/megatron_core-0.16.1-*.whl >/dev/null 2>&1; then
    echo "error: megatron-core is not installed and no megatron_core-0.16.1 wheel is in $wheels;" \
         "run tools/fetch_gpu_wheels.sh where PyPI is reachable and bring $wheels along (carry: [\".whl\"])" >&2
    exit 1
  fi
  site=$(mktemp -d /tmp/megatron_tst_site.XXXXXX)
  "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    "$wheels"/*.whl || { echo "error: installing the wheels in $wheels failed" >&2; exit 1; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# the environment, and whether torch.compile reaches Triton here (megatron-core's SwiGLU and
# bias-dropout-add fusions and our loss kernels compile on CUDA; without a working Triton/C compiler
# the benches run with the fusions off and say so)
"$python" - "$out/environment.txt" "$dry" <<'PY'
import importlib.metadata as metadata, subprocess, sys, time
import torch
lines = [time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())]
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30)
    lines += [smi.stdout.strip()] if smi.returncode == 0 else []
except (OSError, subprocess.TimeoutExpired):
    pass
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"
lines.append(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda})"
             + "".join(f", {n} {version(n)}" for n in ("megatron-core", "triton", "transformers", "transformer-engine")))
gib = 0
if torch.cuda.is_available():
    gib = torch.cuda.get_device_properties(0).total_memory // 2**30
    lines.append(f"{torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}, {gib} GiB")
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(8, device="cuda"))
        lines.append("torch.compile on CUDA: ok")
    except Exception as error:  # noqa: BLE001 - reported, and the benches then run uncompiled
        lines.append(f"torch.compile on CUDA: FAILED ({type(error).__name__}: {str(error).splitlines()[0][:200]})")
else:
    lines.append("no GPU: dry run at tiny shapes" if sys.argv[2] == "1" else "no GPU")
lines.append(f"gpu_memory_gib {gib}")
with open(sys.argv[1], "w") as handle:
    handle.write("\n".join(lines) + "\n")
PY
echo "gpu_check: budget ${budget} s, dry run ${dry}, only '${only}'" >> "$out/environment.txt"
cat "$out/environment.txt"
gpu_gib=$(sed -n 's/^gpu_memory_gib //p' "$out/environment.txt")
gpu_gib=${gpu_gib:-0}
fusion_flags=""
if grep -q "torch.compile on CUDA: FAILED" "$out/environment.txt"; then
  fusion_flags="--no-bias-swiglu-fusion --no-bias-dropout-fusion"
  echo "gpu_check: torch.compile fails here: the benches run with $fusion_flags (the loss kernels fall back to eager)"
fi

printf "step\tstatus\tseconds\tlimit_s\n" > "$out/steps.tsv"
failed=0
summary() { "$python" tools/gpu_summary.py "$out" "$@"; }

# step NAME CEILING_S COMMAND...: COMMAND's output to OUTDIR/NAME.log, under min(CEILING_S, budget left)
step() {
  local name=$1 ceiling=$2 left limit t0 rc
  shift 2
  if [ -n "$only" ] && [[ " $only " != *" $name "* ]]; then return 0; fi
  left=$((budget - (SECONDS - started)))
  if [ "$left" -lt 20 ]; then
    printf "%s\tskipped (budget spent)\t0\t0\n" "$name" >> "$out/steps.tsv"
    echo "[gpu_check +$((SECONDS - started)) s] $name: skipped, ${left} s of the budget left"
    return 0
  fi
  limit=$((ceiling < left ? ceiling : left))
  echo "[gpu_check +$((SECONDS - started)) s] $name: start (limit ${limit} s)"
  t0=$SECONDS
  # timeout puts the command in its own process group and signals all of it (children included)
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  local status="ok"
  [ $rc -eq 0 ] || status="failed (exit $rc)"
  [ $rc -eq 3 ] && status="out of memory (exit 3)"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="timed out"
  printf "%s\t%s\t%s\t%s\n" "$name" "$status" $((SECONDS - t0)) "$limit" >> "$out/steps.tsv"
  echo "[gpu_check +$((SECONDS - started)) s] $name: $status after $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || { failed=1; tail -n 5 "$out/$name.log" | sed 's/^/    /'; }
  summary --quiet
  return $rc
}

if [ "$dry" = 1 ]; then
  quick=(--quick)
  mce_device=(--device cpu --quick --no-memory)
else
  quick=()
  mce_device=(--device cuda --vocab 128256 --positions 8192 --bag-sizes 1 16 --hidden 1024 --repeats 10)
fi
pytest_gpu=("$python" -m pytest -v -rs -m gpu -p no:cacheprovider)
bench=("$python" examples/bench_gpu.py "${quick[@]}")
[ -z "$fusion_flags" ] || bench+=("--model-flags=$fusion_flags")
linear=("$python" examples/bench_mce.py --linear "${mce_device[@]}" --dtype bf16
        --methods linear-fused-compiled linear-mce linear-megatron-fused)

# 1. the headline: 270M MFU ours vs megatron-core's attention, the TST/baseline ratio, the loss
#    kernels; then, in the same process (compiled already), the profile and the micro-batch layouts
step headline 300 "${bench[@]}" --steps 10 --warmup 3 --local-steps 6 --loss-repeats 10 \
  --sections steps memory local losses profile layouts --output "$out/bench_gpu.json"
# 2. the fused output layer + MCE (issue 20)
step linear 90 "${linear[@]}" --json "$out/bench_linear.json"
# 3. the GPU tests of the fast step and the loss kernels (the code behind the figures above)
step tests-fast 150 "${pytest_gpu[@]}" tests/test_gpu_fast_step.py tests/test_gpu_loss_kernels.py
# 4. what --output-layer-loss-fusion buys: micro-batch 4 and 8, off and on
step fusion 120 "${bench[@]}" --warmup 2 --fusion-steps 4 --sections loss-fusion --output "$out/bench_fusion.json"
# 5. the peer at the 270M shape, same batch and dtype
if "$python" -c "import transformers" 2>/dev/null; then
  step peer 120 "$python" examples/bench_peer.py "${quick[@]}" --num-layers 30 --hidden-size 576 \
    --ffn-hidden-size 1536 --num-attention-heads 9 --num-query-groups 3 --vocab-size 128256 --seq-length 2048 \
    --micro-batch-size 4 --steps 8 --warmup 3 ${fusion_flags:+--fusions off} --output "$out/bench_peer.json"
else
  printf "peer\tskipped (transformers not installed)\t0\t0\n" >> "$out/steps.tsv"
fi
# 6. the 3B preset's MFU; out of memory (exit 3): again with full recomputation at micro-batch 1
if [ "$gpu_gib" -ge 120 ]; then layout_3b=(--micro-batch-size 2 --micro-batches 4); else layout_3b=(--micro-batch-size 1 --micro-batches 8); fi
failed_before=$failed
step 3b 150 "${bench[@]}" --preset 3B "${layout_3b[@]}" --steps 5 --warmup 2 --sections steps --step-models gptmodel \
  --output "$out/bench_3b.json"
if [ $? -eq 3 ]; then
  failed=$failed_before  # out of memory is an answer (recorded), not a failure of the script
  step 3b-recompute 150 "${bench[@]}" --preset 3B --micro-batch-size 1 --micro-batches 8 --steps 5 --warmup 2 \
    --sections steps --step-models gptmodel --output "$out/bench_3b.json" \
    "--model-flags=$fusion_flags --recompute-granularity full --recompute-method uniform --recompute-num-layers 1"
fi
# 7. the fused output layer with DDP's main_grad, as pretrain trains
step linear-main-grad 60 "${linear[@]}" --main-grad --json "$out/bench_linear_main_grad.json"
# 8. the other GPU tests; last, the launcher's two-phase run with a SIGTERM resume (minutes on the H200)
step tests-rest 150 "${pytest_gpu[@]}" tests/test_gpu.py tests/test_te.py -k "not launcher"
step tests-launcher 600 "${pytest_gpu[@]}" tests/test_gpu.py -k launcher

echo "[gpu_check +$((SECONDS - started)) s] done; logs and JSON in $out"
summary
echo "gpu_check: $( [ $failed -eq 0 ] && echo "every step ran" || echo "a step FAILED or timed out (steps.tsv)" ); targets in $out/summary.md"
exit $failed
