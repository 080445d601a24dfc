#!/usr/bin/env bash
# README command 2: installs what is missing, builds, and runs the whole test suite.
# Arguments go to ctest, e.g. scripts/test.sh -L unit, or scripts/test.sh -L golden.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
"$root/scripts/build.sh"
build_dir="${MOE_BUILD_DIR:-$root/build}"
ctest --test-dir "$build_dir" --output-on-failure --parallel "${MOE_TEST_JOBS:-2}" "$@"
