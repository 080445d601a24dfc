#!/usr/bin/env bash
# The one prepared script for a GPU machine: every GPU test and benchmark, and the transformers
# peer on the same card, with results under $OUT (default out/gpu). Run from the repository root
# there, after scripts/gpu/bundle.sh here has filled gpu-bundle/ (docs/gpu.md). Each step has
# its own time limit and a failing step does not stop the others; summary.txt lists them all.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=${OUT:-out/gpu}
mkdir -p "$out"
[[ -f gpu-bundle/bundle.tar.xz ]] || { echo "device_checks: run scripts/gpu/bundle.sh first" >&2; exit 2; }
bundle=$PWD/gpu-run
rm -rf "$bundle"
mkdir -p "$bundle"
tar xJf gpu-bundle/bundle.tar.xz -C "$bundle"
nccl=$(python3 -c "import nvidia.nccl,os;print(list(nvidia.nccl.__path__)[0]+'/lib')" 2>/dev/null || true)
export LD_LIBRARY_PATH=$bundle/lib${nccl:+:$nccl}:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export UCX_MODULE_DIR=$bundle/lib/ucx
# The engine test reads the fixtures from this checkout, not from where the bundle was built.
export MOE_TEST_DATA_DIR=$PWD/tests/data
summary=$out/summary.txt
: > "$summary"

step() {  # step NAME SECONDS COMMAND...: output to $out/NAME.log, one line in the summary
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$summary"
}

nvidia-smi > "$out/nvidia-smi.txt" 2>&1
step versions 30 "$bundle/bin/moe" version
for t in "$bundle"/bin/test_*; do
  name=$(basename "$t")
  step "$name" 120 "$t" --gtest_output="xml:$out/$name.xml"
done
step bench_gpu_kernels 240 "$bundle/bin/moe_bench_gpu_kernels" --reps 20
step peer_transformers 300 python3 bench/peer/transformers_peer.py \
  --config "$bundle/v2lite-8L/config.json" --out "$out/peer_transformers.json"
# The kernels' JSON is the log's stdout part; keep a clean copy.
sed -n '/^{/,/^}/p' "$out/bench_gpu_kernels.log" > "$out/bench_gpu_kernels.json"
grep -c . "$summary" >/dev/null
! grep -qv ' rc=0 ' "$summary"
