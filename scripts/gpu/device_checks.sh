#!/usr/bin/env bash
# The one prepared script for a GPU machine: every GPU test and benchmark, and the transformers
# peer on the same card, run from the repository root there after scripts/gpu/bundle.sh here has
# filled gpu-bundle/ (docs/gpu.md). Each step has its own time limit and a failing step does not
# stop the others. What comes back is capped at a few files, so $OUT (default out/gpu) holds:
#   summary.txt             one line per step: name, exit status, seconds
#   results.tar.gz          every step's log and each test's XML, re-packed after every step
#                           (a run cut short still returns what it did)
#   peer_transformers.json, bench_gpu_engine.json, bench_gpu_kernels.json   the figures
#   ncu_summary.json        the engine's kernel time by family (scripts/gpu/ncu_summary.py)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
out=${OUT:-out/gpu}
mkdir -p "$out"
[[ -f gpu-bundle/bundle.tar.xz ]] || { echo "device_checks: run scripts/gpu/bundle.sh first" >&2; exit 2; }
bundle=$PWD/gpu-run
logs=$bundle/results
rm -rf "$bundle"
mkdir -p "$logs"
tar xJf gpu-bundle/bundle.tar.xz -C "$bundle"
nccl=$(python3 -c "import nvidia.nccl,os;print(list(nvidia.nccl.__path__)[0]+'/lib')" 2>/dev/null || true)
export LD_LIBRARY_PATH=$bundle/lib${nccl:+:$nccl}:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export UCX_MODULE_DIR=$bundle/lib/ucx
export PYTHONUNBUFFERED=1
# The engine test reads the fixtures from this checkout, not from where the bundle was built.
export MOE_TEST_DATA_DIR=$PWD/tests/data
summary=$out/summary.txt
: > "$summary"

# The whole run's budget (seconds): a step's limit is cut to what is left, and a step with less
# than 10 s left is skipped, so the script ends, packed, before the caller's own limit.
budget=${MOE_GPU_BUDGET_S:-900}

step() {  # step NAME SECONDS COMMAND...: output to $logs/NAME.log, one line in the summary
  local name=$1 limit=$2
  shift 2
  local left=$((budget - SECONDS))
  if ((left < 10)); then
    echo "$name rc=skipped (budget spent)" | tee -a "$summary"
    return
  fi
  ((limit > left)) && limit=$left
  local start=$SECONDS
  timeout -k 5 "$limit" "$@" > "$logs/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$summary"
  cp "$summary" "$logs/"
  tar czf "$out/results.tar.gz" -C "$logs" .
}

{ nvidia-smi; nvidia-smi -q -d CLOCK,POWER,MEMORY; } > "$logs/nvidia-smi.txt" 2>&1
step versions 30 "$bundle/bin/moe" version
# Correctness first: the kernels against their CPU references, then the engine.
for t in test_runtime_device_allocator test_runtime_gpu test_runtime_nccl_multi_process test_runtime_nccl_world \
         test_kernels_cuda test_kernels_cuda_gather test_kernels_cuda_skinny_linear test_kernels_cuda_gemm \
         test_kernels_cuda_mla test_kernels_cuda_wgmma test_kernels_cuda_grouped_gemm test_kernels_cuda_backward \
         test_kernels_cuda_fp8_quantize test_kernels_cuda_fp8 test_engine_gpu test_engine_gpu_serving test_engine_expert_parallel; do
  [[ -x "$bundle/bin/$t" ]] || { echo "$t rc=missing" | tee -a "$summary"; continue; }
  step "$t" 120 "$bundle/bin/$t" --gtest_output="xml:$logs/$t.xml"
done
# Where the Hopper kernels' own tests failed, their cases once more under compute-sanitizer's
# memcheck (an out-of-bounds or misaligned access, a bad TMA map, named with its kernel and
# address): a diagnosis for the next session, run only then (it is slow).
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for t in test_kernels_cuda_wgmma test_kernels_cuda_grouped_gemm; do
  grep -q "^$t rc=0 " "$summary" || [[ ! -x $sanitizer || ! -x "$bundle/bin/$t" ]] ||
    step "memcheck_$t" 90 "$sanitizer" --tool memcheck --print-limit 20 "$bundle/bin/$t" \
      --gtest_filter='cuda_wgmma.*:cuda_tma.*:cuda_grouped_gemm.wgmma*:cuda_grouped_gemm.fused*'
done
# `moe run --engine gpu` as a user runs it (tests/cli's contract: transformers' tokens in f32).
step cli_gpu_engine 60 bash tests/cli/run_contracts.sh "$bundle/bin/moe" tests/data gpu_engine_greedy
# `moe serve --engine gpu` (whole-model GPU shards behind the controller and the job API) and
# `moe submit`, against `moe run --engine gpu` on the same model, in f32.
step serve_gpu_engine 90 bash tests/integration/serve_submit.sh "$bundle/bin/moe" . gpu-f32
# The peer before our engine, so that the engine's JSON carries the ratios.
step peer_transformers 180 python3 bench/peer/transformers_peer.py \
  --config "$bundle/v2lite-8L/config.json" --out "$logs/peer_transformers.json"
# Then the same weights in FP8 (both kinds of products), with ratios to the bf16 figures. The
# wgmma_experts engine only where the wgmma kernel's own tests passed: a fault there would break
# the process's CUDA context, and the stages after it (the FP8 runs) with it.
wgmma=()
[[ $(grep -Ec '^test_kernels_cuda_(wgmma|grouped_gemm) rc=0 ' "$summary") == 2 ]] || wgmma=(--no-wgmma)
step bench_gpu_engine 240 "$bundle/bin/moe_bench_gpu_engine" --fp8 block_scaled,expand "${wgmma[@]}" \
  --peer "$logs/peer_transformers.json" --out "$logs/bench_gpu_engine.json"
step bench_gpu_kernels 120 "$bundle/bin/moe_bench_gpu_kernels" --reps 20
# The kernels' JSON is the log's stdout part; keep a clean copy.
sed -n '/^{/,/^}/p' "$logs/bench_gpu_kernels.log" > "$logs/bench_gpu_kernels.json"
# One v2lite MoE layer's experts in a world of one (the one H200; its one pair is itself):
# receive buffers of 1/2 to 1/8 of the worst routing (2 to 8 chunks) against the whole exchange,
# at 32 and 4096 tokens: what bounding the exchange's memory costs.
step bench_expert_parallel 60 "$bundle/bin/moe_bench_expert_parallel" --world 1 --reps 10 \
  --out "$logs/bench_expert_parallel.json"
# Where the engine's time goes: every kernel's duration (Nsight Compute, one metric, clocks left
# alone) over a short run: three prefills of 4 x 512, then at batch 1 and 32 twice a prefill of
# 128 tokens and two decode steps. scripts/gpu/ncu_summary.py splits the CSV (in
# results.tar.gz) into those forward passes and sums each kernel's time.
# Prefill's routed experts on the wgmma kernel where its tests passed (the option the A/B
# figures above decide on): the profile then shows what stands after it.
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
profiled=()
((${#wgmma[@]} == 0)) && profiled=(--wgmma-experts)
step ncu_engine 120 "$ncu" --clock-control none --metrics gpu__time_duration.sum --csv \
  --launch-count 4000 "$bundle/bin/moe_bench_gpu_engine" --reps 1 --decode-steps 2 \
  --check-tokens 0 --no-graphs --no-variants "${profiled[@]}" --out "$logs/ncu_engine_bench.json"
python3 scripts/gpu/ncu_summary.py "$logs/ncu_engine.log" > "$logs/ncu_summary.json" 2>&1
for f in peer_transformers.json bench_gpu_engine.json bench_gpu_kernels.json bench_expert_parallel.json \
         ncu_summary.json; do
  [[ -s "$logs/$f" ]] && cp "$logs/$f" "$out/"
done
tar czf "$out/results.tar.gz" -C "$logs" .
! grep -qv ' rc=0 ' "$summary"
