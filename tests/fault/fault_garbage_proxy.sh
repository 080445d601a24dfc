#!/usr/bin/env bash
# Fault f: corrupted and malformed traffic while the cluster serves a steady load.
#
#   - `moe chaos proxy` in front of the job API flips random bits (seeded) in both directions;
#     40 requests go through it (`moe submit`, a process and connection each) beside the 300
#     direct ones (20 a second);
#   - `moe chaos garbage` sends malformed Cap'n Proto frames (truncated, oversized, random, an
#     unknown API version / method / interface) to the job API and to a node's control port.
# Expected: every garbage connection is rejected (closed or answered an error) and both servers
# still answer afterwards; every request not sent through the proxy finishes with exactly the
# baseline's tokens; nothing is lost. Requests through the proxy may end any way (reported).
#
#   fault_garbage_proxy.sh MOE_BINARY REPO_ROOT
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh" "$1" "$2" garbage_proxy

CONFIG=$TMP/cluster.yaml
{
  cluster_yaml 100 3000
  printf 'nodes:\n'
  node_yaml 0 2
  node_yaml 1 2
  model_yaml
  printf 'attention_shards: 1\nexpert_groups: 3\n'
} >"$CONFIG"
echo "    placement: n0: $(holdings n0); n1: $(holdings n1)"

cluster_up
serve_start
baseline

step "moe chaos proxy in front of the API (corrupt-rate 0.001, both directions)"
"$MOE" chaos proxy --listen 127.0.0.1:0 --to "$API" --corrupt-rate 0.001 --seed 11 \
  >"$TMP/api.proxy.out" 2>&1 {SAVED_OUT}>&- {SAVED_ERR}>&- &
PROXY_PID=$!
PIDS+=("$PROXY_PID")
PROXY=
for _ in $(seq 100); do
  PROXY=$(sed -n 's/.*listening on \([^ ]*\) -> .*/\1/p' "$TMP/api.proxy.out")
  [[ -n $PROXY ]] && break
  sleep 0.1
done
[[ -n $PROXY ]] || die "the proxy did not start: $(cat "$TMP/api.proxy.out")"
echo "    proxy at $PROXY"

load_start --requests 300 --rate 20 --deadline 20
# The clients behind the proxy are `moe submit` processes, one per request: a corrupted answer
# may leave a client confused (pycapnp's asyncio stream can even break its event loop), and that
# must stay with that request, not reach the direct clients.
step "40 more requests through the proxy with moe submit, 4 at a time (in the background)"
load_py run --address "$PROXY" --secret-file "$TMP/secret" --out "$TMP/proxied.json" --via-moe "$MOE" \
  --requests 40 --rate 3 --concurrency 4 --deadline 8 --grace 2 --bound 60 --seed 8 \
  >"$TMP/proxied.out" 2>&1 {SAVED_OUT}>&- {SAVED_ERR}>&- &
PROXIED_PID=$!
PIDS+=("$PROXIED_PID")
wait_progress 40
# The node's control port speaks CAF 0.17's BASP, which allocates the payload a header announces
# before reading it: the oversized and random frames (read as a BASP header announcing up to
# 4 GiB) make a node allocate gigabytes and stall its I/O for seconds per connection (with
# cluster.tls they do not get past the handshake). Until the control plane bounds that, the node
# gets the frames that do not decode to such a header.
for target in "$API all" "127.0.0.1:$(control_port 1) truncated,wrong-version"; do
  read -r address kinds <<<"$target"
  step "moe chaos garbage --kind $kinds --count 2 against $address under load"
  "$MOE" chaos garbage --address "$address" --kind "$kinds" --count 2 --timeout 1 --secret-file "$TMP/secret" \
    >"$TMP/garbage.out" 2>&1
  rc=$?
  sed 's/^/    /' "$TMP/garbage.out"
  [[ $rc -eq 0 ]] || fail "moe chaos garbage against $address exited $rc (a frame not rejected, or no answer after)"
done
load_wait
wait "$PROXIED_PID"
echo "    through the proxy (any outcome; not compared): $(grep '^load.py run:' "$TMP/proxied.out")"
python3 - "$TMP/proxied.json" <<'PY'
import json, re, sys
seen = {}
for r in json.load(open(sys.argv[1]))["requests"]:
    key = r["outcome"] + ": " + re.sub(r"\d+", "N", (r.get("error") or "").splitlines()[0] if r.get("error") else "")[:120]
    seen[key] = seen.get(key, 0) + 1
for k, n in sorted(seen.items(), key=lambda kv: -kv[1]):
    print(f"      {n:3d} x {k}")
PY
kill -TERM "$PROXY_PID" 2>/dev/null
wait "$PROXY_PID" 2>/dev/null
echo "    proxy: $(grep -c ': open$' "$TMP/api.proxy.out") connections," \
  "$(grep -o '[0-9]* bits flipped' "$TMP/api.proxy.out" | awk '{ s += $1 } END { print s + 0 }') bits flipped"

step "every node still up"
"$MOE" cluster status --config "$CONFIG" --run-dir "$RUN" >"$TMP/status.out" 2>&1 ||
  fail "not every node is up after the garbage: $(cat "$TMP/status.out")"
kill -0 "$SERVE_PID" 2>/dev/null || fail "the coordinator exited"
# A request after all of it, on a fresh connection.
load_py run --address "$API" --secret-file "$TMP/secret" --out "$TMP/after.json" --baseline-pool --pool 8 \
  --expect-all-finished >"$TMP/after.out" 2>&1 || fail "requests after the faults failed: $(cat "$TMP/after.out")"

compare --label "corrupting proxy + garbage frames" --require-all-finished
finish
