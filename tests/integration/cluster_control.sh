#!/usr/bin/env bash
# `moe cluster up|status|down` and `moe node` as an operator runs them: two nodes on 127.0.0.1,
# a coordinator and a node with the wrong secret (refused, logged, counted), a node killed with
# SIGKILL (reported down, exit 3), then `down` stops the rest and nothing is left running.
#
#   cluster_control.sh MOE_BINARY
set -u
MOE=$1
TMP=$(mktemp -d "${TMPDIR:-/tmp}/moe-cluster-control.XXXXXX") || exit 2
RUN="$TMP/run"
STRAY_PID=
# Every process this test starts is a session leader (moe cluster up and setsid below): kill
# their groups, whatever state the test stopped in.
cleanup() {
  for f in "$RUN"/*.pid "$TMP"/*.pid; do
    [[ -f $f ]] && kill -KILL -- "-$(cat "$f")" 2>/dev/null
  done
  [[ -n $STRAY_PID ]] && kill -KILL -- "-$STRAY_PID" 2>/dev/null
  rm -rf "$TMP"
}
trap cleanup EXIT
FAILURES=0
fail() {
  echo "FAIL: $*" >&2
  FAILURES=$((FAILURES + 1))
}
# Running and not a zombie (a killed node's parent may never reap it here).
alive() {
  local state
  state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [[ -n $state && $state != Z* ]]
}

# Three fixed ports per node from a range unlikely to be in use; the first free base wins.
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
BASE=
for base in $(seq 20000 97 29000); do
  ok=1
  for off in 0 1 10 11 20 21 30 31 32; do port_free $((base + off)) || { ok=0; break; }; done
  ((ok)) && { BASE=$base; break; }
done
[[ -n $BASE ]] || { echo "FAIL: no free ports" >&2; exit 1; }

write_config() {  # FILE SECRET NODES...
  local file=$1 secret=$2
  shift 2
  {
    printf 'cluster:\n  name: cc-test\n  secret: %s\n  heartbeat_interval_ms: 100\n  failure_timeout_ms: 1000\n' "$secret"
    printf 'nodes:\n'
    for n in "$@"; do
      printf '  - {name: n%s, host: 127.0.0.1, control_port: %s, metrics_port: %s, devices: {cpu_slots: 1}, memory: 1GiB}\n' \
        "$n" $((BASE + 10 * n)) $((BASE + 10 * n + 1))
    done
    printf 'model: {preset: tiny}\nports: {control: %s, api: %s, metrics: %s}\n' $((BASE + 30)) $((BASE + 31)) $((BASE + 32))
  } >"$file"
}
write_config "$TMP/good.yaml" right-secret 0 1
write_config "$TMP/wrong.yaml" wrong-secret 0 1
write_config "$TMP/wrong-n2.yaml" wrong-secret 2
write_config "$TMP/good-with-n2.yaml" right-secret 2

# --dry-run starts nothing and shows the commands.
"$MOE" cluster up --config "$TMP/good.yaml" --run-dir "$RUN" --dry-run >"$TMP/dry.out" 2>&1 || fail "dry run failed"
grep -q "node --config .* --name n1" "$TMP/dry.out" || fail "dry run lacks the node command: $(cat "$TMP/dry.out")"
[[ ! -e $RUN ]] || fail "dry run created the run dir"

# up: both nodes answer.
if ! "$MOE" cluster up --config "$TMP/good.yaml" --run-dir "$RUN" --timeout 60 >"$TMP/up.out" 2>&1; then
  fail "cluster up failed: $(cat "$TMP/up.out")"
  cat "$RUN"/*.log >&2
  exit 1
fi
cat "$TMP/up.out"
PID0=$(cat "$RUN/n0.pid")
PID1=$(cat "$RUN/n1.pid")
alive "$PID0" && alive "$PID1" || fail "node pids not running after up"

"$MOE" cluster status --config "$TMP/good.yaml" --run-dir "$RUN" >"$TMP/status1.out" 2>&1
rc=$?
cat "$TMP/status1.out"
[[ $rc -eq 0 ]] || fail "status with both up exited $rc"
[[ $(grep -cE '^n[01] +127\.0\.0\.1:[0-9]+ +up ' "$TMP/status1.out") -eq 2 ]] || fail "status does not show both nodes up"

# A coordinator with the wrong secret is refused by both nodes.
"$MOE" cluster status --config "$TMP/wrong.yaml" --run-dir "$RUN" >"$TMP/wrong.out" 2>&1
rc=$?
[[ $rc -eq 3 ]] || fail "status with the wrong secret exited $rc, not 3"
[[ $(grep -cE '^n[01] .* refused ' "$TMP/wrong.out") -eq 2 ]] || fail "wrong secret not refused: $(cat "$TMP/wrong.out")"
grep -q "refused status" "$RUN/n0.log" || fail "n0's log does not say it refused: $(cat "$RUN/n0.log")"
grep -q "wrong-secret" "$RUN/n0.log" && fail "n0's log shows the secret presented"
if command -v curl >/dev/null; then
  curl -sf "http://127.0.0.1:$((BASE + 1))/metrics" >"$TMP/metrics" || fail "cannot scrape n0's metrics"
  grep -q '^moe_node_up 1' "$TMP/metrics" || fail "n0: no moe_node_up 1"
  grep -qE '^moe_node_refused_joins_total [1-9]' "$TMP/metrics" || fail "n0: refused joins not counted"
fi

# A node started with the wrong secret refuses the right coordinator.
setsid "$MOE" node --config "$TMP/wrong-n2.yaml" --name n2 >"$TMP/n2.log" 2>&1 &
STRAY_PID=$!
echo "$STRAY_PID" >"$TMP/n2.pid"
state=
for _ in $(seq 100); do
  "$MOE" cluster status --config "$TMP/good-with-n2.yaml" --run-dir "$RUN" >"$TMP/n2status.out" 2>&1
  state=$(awk '$1 == "n2" {print $3}' "$TMP/n2status.out")
  [[ $state == refused ]] && break
  alive "$STRAY_PID" || break
  sleep 0.1
done
[[ $state == refused ]] || fail "the wrong-secret node was not refused: $(cat "$TMP/n2status.out" "$TMP/n2.log")"
grep -q "refused status" "$TMP/n2.log" || fail "n2's log does not say it refused"
kill -TERM "$STRAY_PID"
for _ in $(seq 100); do alive "$STRAY_PID" || break; sleep 0.1; done
alive "$STRAY_PID" && fail "n2 ignored SIGTERM"
grep -q "stopped" "$TMP/n2.log" || fail "n2 did not stop cleanly on SIGTERM: $(cat "$TMP/n2.log")"

# SIGKILL one node: status reports it down and exits 3.
kill -KILL "$PID0"
for _ in $(seq 100); do alive "$PID0" || break; sleep 0.05; done
"$MOE" cluster status --config "$TMP/good.yaml" --run-dir "$RUN" >"$TMP/status2.out" 2>&1
rc=$?
cat "$TMP/status2.out"
[[ $rc -eq 3 ]] || fail "status with a killed node exited $rc, not 3"
grep -qE '^n0 .* down ' "$TMP/status2.out" || fail "n0 not reported down"
grep -qE '^n1 .* up ' "$TMP/status2.out" || fail "n1 not reported up"

# down stops the rest and removes the run dir; nothing is left running.
"$MOE" cluster down --config "$TMP/good.yaml" --run-dir "$RUN" >"$TMP/down.out" 2>&1 || fail "down failed: $(cat "$TMP/down.out")"
cat "$TMP/down.out"
alive "$PID1" && fail "n1 still running after down"
alive "$PID0" && fail "n0 still running after down"
[[ ! -e $RUN ]] || fail "run dir left behind"

if ((FAILURES > 0)); then
  echo "$FAILURES failure(s)" >&2
  exit 1
fi
echo "ok"
