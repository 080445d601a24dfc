#!/usr/bin/env bash
# `moe demo --processes 3` (this process + two `moe node` processes) prints the same generations
# as `moe demo` in one process, and leaves no node process or run directory behind.
#   demo_processes.sh MOE_BINARY
set -euo pipefail
moe=${1:?usage: $0 MOE_BINARY}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export MOE_MODEL_CACHE="$work/cache"

"$moe" demo > "$work/one.txt" 2>&1 || { cat "$work/one.txt"; echo "FAIL: moe demo"; exit 1; }
"$moe" demo --processes 3 > "$work/three.txt" 2>&1 || { cat "$work/three.txt"; echo "FAIL: moe demo --processes 3"; exit 1; }

generations() { grep -E '^  \[[0-9]+\] (greedy|sampled)' "$1"; }
if ! diff <(generations "$work/one.txt") <(generations "$work/three.txt"); then
  echo "FAIL: the generations differ between one process and three"; cat "$work/three.txt"; exit 1
fi
[ "$(generations "$work/three.txt" | wc -l)" -eq 6 ] || { echo "FAIL: expected 6 generations"; cat "$work/three.txt"; exit 1; }
grep -q "started 2 node processes" "$work/three.txt" || { echo "FAIL: no node processes were started"; exit 1; }
grep -Eq "expert group [0-9]+ +n1/" "$work/three.txt" || { echo "FAIL: nothing placed on node n1"; cat "$work/three.txt"; exit 1; }
run_dir=$(sed -n 's/.*(logs in \(.*\))$/\1/p' "$work/three.txt")
[ -n "$run_dir" ] && [ ! -e "$run_dir" ] || { echo "FAIL: run dir $run_dir left behind"; exit 1; }
echo "ok: 6 generations identical across 1 and 3 processes"
