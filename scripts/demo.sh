#!/usr/bin/env bash
# README command 1: installs what is missing, builds, and runs `moe demo` on the embedded
# default model. Arguments go to `moe demo`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
"$root/scripts/build.sh"
build_dir="${MOE_BUILD_DIR:-$root/build}"
exec "$build_dir/cli/moe" demo "$@"
