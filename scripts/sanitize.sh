#!/usr/bin/env bash
# The sanitizer stage (scripts/test.sh runs it after the normal suite unless MOE_SANITIZERS=0).
# Builds, with clang, AddressSanitizer and UndefinedBehaviorSanitizer, the
# executables of the unit and integration tests (`moe` and the test tools included, so the
# processes the tests start are checked too) and the libFuzzer targets, into
# ${MOE_SANITIZE_BUILD_DIR:-build-asan}; runs ctest -L 'unit|integration' there, then every fuzz
# target for MOE_FUZZ_SECONDS (default 20) over its corpus (ctest -L fuzz).
# Sanitizer reports go to files (a process a test starts may report where no test prints its
# stderr); any report fails the stage, and all of them are printed at the end.
# Arguments go to both ctest runs, e.g. scripts/sanitize.sh -R cluster_config.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build_dir="${MOE_SANITIZE_BUILD_DIR:-$root/build-asan}"
jobs="${MOE_JOBS:-$(nproc)}"
test_jobs="${MOE_TEST_JOBS:-2}"

if [[ ! -f "$build_dir/CMakeCache.txt" ]]; then
  # -O1 keeps the instrumented tests fast enough; line tables are all a stack trace needs and
  # build and link much faster than full debug information. No NDEBUG: assertions stay on.
  CC=clang CXX=clang++ cmake -S "$root" -B "$build_dir" -G Ninja -DMOE_CUDA=OFF -DMOE_BUILD_BENCH=OFF \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -gline-tables-only" \
    "-DCMAKE_C_FLAGS_RELWITHDEBINFO=-O1 -gline-tables-only" \
    -DMOE_SANITIZE=address,undefined -DMOE_FUZZ=ON -DMOE_FUZZ_SECONDS="${MOE_FUZZ_SECONDS:-20}"
elif [[ -n ${MOE_FUZZ_SECONDS:-} ]]; then
  cmake "$build_dir" -DMOE_FUZZ_SECONDS="$MOE_FUZZ_SECONDS" >/dev/null
fi

report_dir="$build_dir/sanitizer-reports"
rm -rf "$report_dir"
mkdir -p "$report_dir"
symbolizer="$(command -v llvm-symbolizer || true)"
[[ -z $symbolizer && -x /usr/lib/llvm-14/bin/llvm-symbolizer ]] && symbolizer=/usr/lib/llvm-14/bin/llvm-symbolizer
if [[ -n $symbolizer ]]; then export ASAN_SYMBOLIZER_PATH="$symbolizer"; fi
# log_path: one file per reporting process (report.<pid>; the same in both, as the two runtimes
# share it and the last one read wins). detect_leaks: LeakSanitizer at every
# sanitized process's exit, with suppressions for third-party libraries only.
export ASAN_OPTIONS="halt_on_error=1:detect_leaks=1:check_initialization_order=1:log_path=$report_dir/report"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$report_dir/report"
export LSAN_OPTIONS="suppressions=$root/tests/sanitizers/lsan.supp:print_suppressions=0"
# OpenBLAS' idle threads spin (sched_yield) while the instrumented code between two GEMMs runs,
# several times slower than usual: on 2 cores, with two tests at a time, they took most of the
# CPU (`moe demo` 46 s alone, 157 s under ctest; 33 s with one thread). Which thread computes a
# GEMM is not what this stage checks (OpenBLAS itself is not instrumented).
export OPENBLAS_NUM_THREADS=1

# Prints every report; fails when there was one.
print_reports() {
  local found=0
  for f in "$report_dir"/*; do
    [[ -e $f ]] || continue
    found=1
    echo "=== sanitizer report $(basename "$f")"
    cat "$f"
  done
  return $found
}

status=0
start=$(date +%s)
# The build runs the test executables to list their tests: the options above apply there too.
cmake --build "$build_dir" --parallel "$jobs" --target moe_tests_unit_integration moe_fuzz_targets
echo "sanitize: build finished in $(( $(date +%s) - start )) s"

start=$(date +%s)
ctest --test-dir "$build_dir" --output-on-failure --parallel "$test_jobs" -L 'unit|integration' "$@" || status=1
echo "sanitize: unit and integration tests finished in $(( $(date +%s) - start )) s"

start=$(date +%s)
# libFuzzer handles its own crashes and leaks (it writes the input next to the report); its
# targets report to stderr, which ctest shows for a failed test.
ASAN_OPTIONS="${ASAN_OPTIONS%%:log_path=*}" UBSAN_OPTIONS="${UBSAN_OPTIONS%%:log_path=*}" \
  ctest --test-dir "$build_dir" --output-on-failure --parallel "$test_jobs" -L fuzz "$@" || status=1
echo "sanitize: fuzz targets finished in $(( $(date +%s) - start )) s"

if ! print_reports; then
  echo "sanitize: the sanitizers reported errors (above; one file per process in $report_dir)" >&2
  status=1
fi
exit $status
