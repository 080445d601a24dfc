#!/usr/bin/env bash
# README command 2: installs what is missing, builds, and runs the whole test suite, then the
# sanitizer stage (scripts/sanitize.sh: the unit and integration tests built with ASan and UBSan,
# and the fuzz targets for a bounded time); MOE_SANITIZERS=0 skips the stage.
# Arguments go to ctest, e.g. scripts/test.sh -L unit, or scripts/test.sh -L golden (the
# sanitizer stage runs its own selection).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
"$root/scripts/build.sh"
build_dir="${MOE_BUILD_DIR:-$root/build}"
ctest --test-dir "$build_dir" --output-on-failure --parallel "${MOE_TEST_JOBS:-2}" "$@"
# About 20 minutes more on 2 cores (a second build with clang, the tests, 20 s per fuzz target).
if [[ ${MOE_SANITIZERS:-1} == 1 ]]; then
  "$root/scripts/sanitize.sh"
fi
