#!/usr/bin/env bash
# Download, on a machine that reaches PyPI, the wheels a bare GPU box (Python 3.12, torch, no
# megatron-core) needs to run tools/gpu_check.sh: megatron-core 0.16.1 for CPython 3.12 on x86-64.
# Usage: tools/fetch_gpu_wheels.sh [DIR]   (default: .whl/ at the repository root, git-ignored)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$root/.whl}
mkdir -p "$dir"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dir" "megatron-core==0.16.1"
ls -1 "$dir"
