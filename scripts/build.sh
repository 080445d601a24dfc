#!/usr/bin/env bash
# Configures and builds the tree into ${MOE_BUILD_DIR:-build}. Extra arguments go to CMake,
# e.g. scripts/build.sh -DMOE_CUDA=OFF.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build_dir="${MOE_BUILD_DIR:-$root/build}"
generator=()
if command -v ninja >/dev/null; then generator=(-G Ninja); fi
if [[ ! -f "$build_dir/CMakeCache.txt" ]]; then
  cmake -S "$root" -B "$build_dir" "${generator[@]}" -DCMAKE_BUILD_TYPE="${MOE_BUILD_TYPE:-Release}" "$@"
elif (($# > 0)); then
  cmake "$build_dir" "$@"
fi
cmake --build "$build_dir" --parallel "${MOE_JOBS:-$(nproc)}"
