#!/usr/bin/env bash
# Builds what the GPU checks run (Release, CUDA on, sm_90a + compute_90 PTX) and packs it, with
# every shared library it loads that a bare GPU machine lacks, into gpu-bundle/bundle.tar.xz, so
# that scripts/gpu/device_checks.sh can run there (see docs/gpu.md). The GPU machine brings
# glibc, the CUDA toolkit (/usr/local/cuda) and NCCL (Python's nvidia-nccl); everything else
# travels. Compressed, because what may travel is capped (64 MiB) and OpenBLAS alone is 36 MB.
#
#   scripts/gpu/bundle.sh            configure and build build-gpu/, then pack
#   BUILD_DIR=build scripts/gpu/bundle.sh --no-configure   pack from an existing CUDA build
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
build=${BUILD_DIR:-build-gpu}
stage=gpu-bundle/stage
if [[ "${1:-}" != "--no-configure" ]]; then
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOE_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="90a-real;90-virtual" -DMOE_BUILD_TESTS=ON -DMOE_BUILD_BENCH=ON
fi
targets=(test_runtime_gpu test_runtime_nccl_multi_process test_runtime_nccl_world test_runtime_device_allocator
         test_kernels_cuda test_kernels_cuda_gemm test_kernels_cuda_gather test_kernels_cuda_skinny_linear
         test_kernels_cuda_mla test_kernels_cuda_wgmma test_kernels_cuda_grouped_gemm test_kernels_cuda_backward
         test_kernels_cuda_fp8_quantize test_kernels_cuda_fp8 test_engine_gpu test_engine_gpu_serving test_engine_expert_parallel
         moe_bench_gpu_kernels moe_bench_gpu_engine moe_bench_expert_parallel moe)
ninja -C "$build" "${targets[@]}"

rm -rf gpu-bundle
bundle=$stage
mkdir -p "$bundle/bin" "$bundle/lib"
for t in "${targets[@]}"; do
  f=$(find "$build" -type f -name "$t" -perm -u+x | head -1)
  [[ -n "$f" ]] || { echo "bundle: $t was not built" >&2; exit 1; }
  cp "$f" "$bundle/bin/"
  strip --strip-unneeded "$bundle/bin/$t"
done
# Libraries the GPU machine has itself: glibc's, the compiler runtime, CUDA's and NCCL.
system='^(linux-vdso|ld-linux|libc\.|libm\.|libdl\.|librt\.|libpthread\.|libgcc_s\.|libstdc\+\+\.|libcuda\.|libcudart\.|libcublas|libnccl\.)'
for f in "$bundle"/bin/*; do
  ldd "$f" | awk '/=> \// {print $3}'
done | sort -u | while read -r lib; do
  name=$(basename "$lib")
  [[ "$name" =~ $system ]] && continue
  cp -L "$lib" "$bundle/lib/$name"
  strip --strip-unneeded "$bundle/lib/$name" 2>/dev/null || true
done
# UCX loads its transports at run time from here (UCX_MODULE_DIR).
cp -rL /usr/lib/x86_64-linux-gnu/ucx "$bundle/lib/ucx"
"$bundle/bin/moe" init-model --preset v2lite-8L --dtype bf16 --config-only --out "$bundle/v2lite-8L" >/dev/null
tar cJf gpu-bundle/bundle.tar.xz -C "$stage" .
rm -rf "$stage"
ls -l gpu-bundle/bundle.tar.xz
