# What the fault tests share (sourced, not run): a temp dir and a trap that removes everything
# the test started, free ports, a cluster of `moe node` processes (`moe cluster up`) with a
# coordinator (`moe serve --join-nodes`), the load driver (load.py) and `moe chaos`.
#
#   source lib.sh MOE_BINARY REPO_ROOT TEST_NAME
#
# A test exits 0 (pass), 1 (fail) or 77 (skipped, with the reason on stderr). Set
# MOE_FAULT_KEEP=1 to keep the temp dir (logs, JSON) after a run.
set -u
if [[ $# -lt 3 ]]; then
  echo "usage: source lib.sh MOE_BINARY REPO_ROOT TEST_NAME" >&2
  exit 2
fi
MOE=$(realpath "$1")
ROOT=$(realpath "$2")
FAULT_TEST=$3
MODEL=$ROOT/tests/data/tiny-v3
T_START=$(date +%s.%N)

step() { echo "==> [$(date +%H:%M:%S.%3N)] $*"; }
skip() {
  echo "SKIP: $FAULT_TEST: $*" >&2
  exit 77
}
FAILURES=0
fail() {
  echo "FAIL: $FAULT_TEST: $*" >&2
  FAILURES=$((FAILURES + 1))
}

[[ -x $MOE ]] || { echo "FAIL: $MOE is not executable" >&2; exit 1; }
PY=${MOE_VENV:-$ROOT/.venv}/bin/python
[[ -x $PY ]] && PYTHONPATH=${MOE_FAULT_PYTHONPATH:-$ROOT/python} "$PY" -c "import capnp, moe_client" 2>/dev/null ||
  skip "no project venv with pycapnp at $PY: the load driver uses python/moe_client (scripts/setup.sh makes it)"
# MOE_FAULT_PYTHONPATH: another copy of the client (e.g. an installed one) instead of python/.
load_py() { PYTHONPATH=${MOE_FAULT_PYTHONPATH:-$ROOT/python} "$PY" "$ROOT/tests/fault/load.py" "$@"; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/moe-fault-$FAULT_TEST.XXXXXX") || exit 2
RUN=$TMP/run
export MOE_MODEL_CACHE=$TMP/cache
SECRET=fault-$$-$RANDOM$RANDOM
printf '%s\n' "$SECRET" >"$TMP/secret"
chmod 0600 "$TMP/secret"

# The script's own stdout/stderr, for cleanup (a trap may run inside a redirection).
exec {SAVED_OUT}>&1 {SAVED_ERR}>&2
PIDS=()      # background processes of this test (serve, load, proxy)
CONFIG=      # set by the test once written: `moe cluster down` uses it
CLEANED=0
fault_extra_cleanup() { :; }  # a test may redefine it (namespaces)

show_logs() {
  local f
  for f in "$RUN"/*.log "$TMP"/logs/*.log "$TMP"/serve.out "$TMP"/serve.err "$TMP"/*.proxy.out; do
    [[ -f $f ]] || continue
    echo "----- $(basename "$f") (last 40 lines) -----" >&2
    tail -n 40 "$f" >&2
  done
}

cleanup() {
  local rc=$?
  ((CLEANED)) && return
  CLEANED=1
  trap '' INT TERM
  exec 1>&"$SAVED_OUT" 2>&"$SAVED_ERR"
  local f pid
  # A stopped node ignores everything but SIGKILL and SIGCONT: let it run so it can be stopped.
  for f in "$RUN"/*.pid; do [[ -f $f ]] && kill -CONT -- "-$(cat "$f")" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for _ in $(seq 50); do
    local alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
  # `moe cluster down` removes the run dir with the nodes' logs: keep them for the report.
  mkdir -p "$TMP/logs" && cp "$RUN"/*.log "$TMP/logs/" 2>/dev/null
  if [[ -n $CONFIG && -d $RUN ]]; then
    timeout 30 "$MOE" cluster down --config "$CONFIG" --run-dir "$RUN" --timeout 6 --call-timeout 1 \
      >"$TMP/down.out" 2>&1
  fi
  for f in "$RUN"/*.pid; do [[ -f $f ]] && kill -KILL -- "-$(cat "$f")" 2>/dev/null; done
  fault_extra_cleanup
  if [[ -n ${MOE_FAULT_KEEP:-} ]]; then
    echo "kept $TMP"
  else
    rm -rf "$TMP"
  fi
  awk -v t0="$T_START" -v t1="$(date +%s.%N)" -v name="$FAULT_TEST" 'BEGIN { printf "%s: %.1f s\n", name, t1 - t0 }'
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

die() {
  echo "FAIL: $FAULT_TEST: $*" >&2
  show_logs
  exit 1
}

# Ports: nodes i = 0..4 take BASE+10i (control) and BASE+10i+1 (metrics); the config's own ports
# are BASE+50..52 (moe serve overrides api and metrics with ephemeral ones). The search starts
# at a place that depends on the PID so that tests running at once rarely race for a base.
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
BASE=
for i in $(seq 0 80); do
  base=$((20000 + (($$ + i * 37) % 80) * 100))
  ok=1
  for off in 0 1 10 11 20 21 30 31 40 41 50 51 52; do port_free $((base + off)) || { ok=0; break; }; done
  ((ok)) && { BASE=$base; break; }
done
[[ -n $BASE ]] || die "no free ports"
control_port() { echo $((BASE + 10 * $1)); }

# node_yaml I SLOTS [HOST]: one entry of `nodes:` for node nI.
node_yaml() {
  printf '  - {name: n%s, host: %s, control_port: %s, metrics_port: %s, devices: {cpu_slots: %s}, memory: 2GiB}\n' \
    "$1" "${3:-127.0.0.1}" $((BASE + 10 * $1)) $((BASE + 10 * $1 + 1)) "$2"
}
# cluster_yaml HEARTBEAT_MS FAILURE_TIMEOUT_MS: the common head of a test config.
cluster_yaml() {
  printf 'cluster:\n  name: fault-%s-%s\n  secret: %s\n  heartbeat_interval_ms: %s\n  failure_timeout_ms: %s\n' \
    "$FAULT_TEST" "$$" "$SECRET" "$1" "$2"
}
# The tail: model, small batches (a corrupted request cannot ask for much), ports.
model_yaml() {
  printf 'model:\n  path: %s\nbatching: {max_running_requests: 32, max_new_tokens_limit: 64}\n' "$MODEL"
  printf 'ports: {control: %s, api: %s, metrics: %s}\n' $((BASE + 50)) $((BASE + 51)) $((BASE + 52))
}

# three_node_config HEARTBEAT_MS FAILURE_TIMEOUT_MS [LINE]: writes $CONFIG for the fault tests'
# usual cluster: nodes n0, n1, n2 of one CPU slot each, one attention shard, three expert groups
# without replicas, then LINE (a training block, say).
three_node_config() {
  CONFIG=$TMP/cluster.yaml
  {
    cluster_yaml "$1" "$2"
    printf 'nodes:\n'
    node_yaml 0 1
    node_yaml 1 1
    node_yaml 2 1
    model_yaml
    printf 'attention_shards: 1\nexpert_groups: 3\n'
    if [[ -n ${3:-} ]]; then printf '%s\n' "$3"; fi
  } >"$CONFIG"
}

# pick_victim PATTERN: prints each node's placement, and sets VICTIM to the first of n2, n1, n0
# whose holdings match the glob PATTERN and include no attention shard (empty if none does).
pick_victim() {
  VICTIM=
  local n held
  for n in n2 n1 n0; do
    held=$(holdings $n)
    echo "    placement: $n: $held"
    # shellcheck disable=SC2053  # PATTERN is a glob
    if [[ -z $VICTIM && $held == $1 && $held != *attention:* ]]; then VICTIM=$n; fi
  done
}

# holdings NODE: what `moe plan` places on NODE, one word per actor: "attention:0 group:1:0-7".
holdings() {
  "$MOE" plan --config "$CONFIG" --json | python3 -c '
import json, sys
node = sys.argv[1]
p = json.load(sys.stdin)["placement"]
def ranges(ids):
    out, ids = [], sorted(ids)
    for i in ids:
        if out and out[-1][1] == i - 1: out[-1][1] = i
        else: out.append([i, i])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in out)
words = ["attention:%d" % a["shard"] for a in p["attention"] if a["device"]["node"] == node]
words += ["group:%d:%s" % (g["group"], ranges(g["experts"])) for g in p["expert_groups"] if g["device"]["node"] == node]
print(" ".join(words))' "$1"
}
# experts_elsewhere NODE: the experts held by groups on other nodes, as a sorted list.
experts_elsewhere() {
  "$MOE" plan --config "$CONFIG" --json | python3 -c '
import json, sys
p = json.load(sys.stdin)["placement"]
print(" ".join(str(e) for e in sorted({e for g in p["expert_groups"] if g["device"]["node"] != sys.argv[1]
                                      for e in g["experts"]})))' "$1"
}

# cluster_up: the node processes of $CONFIG.
cluster_up() {
  step "moe cluster up ($(grep -c '^  - {name' "$CONFIG") nodes)"
  "$MOE" cluster up --config "$CONFIG" --run-dir "$RUN" --timeout 60 >"$TMP/up.out" 2>&1 ||
    die "moe cluster up failed: $(cat "$TMP/up.out")"
}

# serve_start: the coordinator; sets API (HOST:PORT) and METRICS (URL).
SERVE_PID=
API=
METRICS=
SERVE_HOST=127.0.0.1
# shellcheck disable=SC2120  # HOST is optional: the network fault test passes one
serve_start() {
  local host=${1:-127.0.0.1}
  SERVE_HOST=$host
  step "moe serve --join-nodes"
  "$MOE" serve --config "$CONFIG" --join-nodes --host "$host" --api-port 0 --metrics-port 0 --join-timeout 60 \
    >>"$TMP/serve.out" 2>>"$TMP/serve.err" {SAVED_OUT}>&- {SAVED_ERR}>&- &
  SERVE_PID=$!
  PIDS+=("$SERVE_PID")
  local line=
  for _ in $(seq 900); do
    # One read: the count and the last line must come from the same moment (a second grep saw
    # the new coordinator's line while the first had returned the old one's port).
    local lines
    lines=$(grep "^serving " "$TMP/serve.out" 2>/dev/null)
    line=$(tail -n 1 <<<"$lines")
    [[ -n $line && $(grep -c . <<<"$lines") -ge ${SERVE_STARTS:-1} ]] && break
    line=
    kill -0 "$SERVE_PID" 2>/dev/null || break
    sleep 0.1
  done
  [[ -n $line ]] || die "moe serve did not come up"
  API=$host:$(sed -E 's/.*API on [^:]+:([0-9]+),.*/\1/' <<<"$line")
  METRICS=$(sed -E 's/.*metrics at ([^ ]+).*/\1/' <<<"$line")
  echo "    $line"
}
# serve_stop: SIGTERM the coordinator and wait (bounded).
serve_stop() {
  kill -TERM "$SERVE_PID" 2>/dev/null
  for _ in $(seq 300); do kill -0 "$SERVE_PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$SERVE_PID" 2>/dev/null
  wait "$SERVE_PID" 2>/dev/null
}

# baseline: each prompt of the pool once, on the healthy cluster.
baseline() {
  step "baseline: every prompt of the pool once"
  load_py run --address "$API" --secret-file "$TMP/secret" --out "$TMP/baseline.json" --baseline-pool \
    --concurrency 8 --expect-all-finished "$@" || die "the baseline run failed"
}

# load_start ARGS...: the steady load in the background (LOAD_PID); progress in $TMP/progress.
LOAD_PID=
load_start() {
  step "steady load: $* (in the background)"
  rm -f "$TMP/progress"
  load_py run --address "$API" --secret-file "$TMP/secret" --out "$TMP/fault.json" --progress "$TMP/progress" \
    "$@" >"$TMP/load.out" 2>&1 {SAVED_OUT}>&- {SAVED_ERR}>&- &
  LOAD_PID=$!
  PIDS+=("$LOAD_PID")
}
# wait_progress N: until N requests of the load ended (at most 120 s).
wait_progress() {
  local done=0
  for _ in $(seq 1200); do
    done=$(cut -d' ' -f1 "$TMP/progress" 2>/dev/null || echo 0)
    [[ ${done:-0} -ge $1 ]] && return 0
    kill -0 "$LOAD_PID" 2>/dev/null || break
    sleep 0.1
  done
  cat "$TMP/load.out" >&2
  die "the load did not reach $1 ended requests (at ${done:-0})"
}
# load_wait: the load's end; its summary line.
load_wait() {
  wait "$LOAD_PID"
  local rc=$?
  cat "$TMP/load.out"
  [[ $rc -eq 0 ]] || die "the load driver exited $rc"
}

# chaos ARGS...: `moe chaos ARGS`, echoed; FAULT_UNIX is the time it printed.
FAULT_UNIX=
chaos() {
  local out rc
  out=$("$MOE" chaos "$@" 2>&1)
  rc=$?
  echo "$out" | sed 's/^/    /'
  [[ $rc -eq 0 ]] || die "moe chaos $* exited $rc"
  local t
  t=$(sed -n 's/.*(unix \([0-9.]*\)).*/\1/p' <<<"$out" | head -n 1)
  [[ -n $t ]] && FAULT_UNIX=$t
  return 0
}

# compare ARGS...: load.py compare of the fault run against the baseline.
compare() {
  load_py compare --baseline "$TMP/baseline.json" --run "$TMP/fault.json" --coordinator-log "$TMP/serve.out" \
    --metrics-url "$METRICS" "$@" || FAILURES=$((FAILURES + 1))
}

# training_fault_run VICTIM FAULT INJECT LABEL [ROLLBACKS]: the body of the training fault
# tests, on the cluster of $CONFIG (brought up here unless a coordinator runs already). A training job (the job API's train, tests/data/corpus, 40
# steps) runs once on the healthy cluster for the baseline losses; the coordinator is restarted
# (the nodes drop its actors; the new one places fresh ones from the checkpoint) and the same job
# runs again; once it has reported step 12, `INJECT VICTIM` injects the fault (a function of the
# test; it leaves FAULT_UNIX at the fault's time, as `chaos` does). Then load.py compare-train:
# every step's loss against the baseline's, at least one rollback to a snapshot, and the
# detection and recovery times after FAULT_UNIX. FAULT names the fault in the progress line
# ("SIGKILL"); LABEL is compare-train's label, a printf format given the step the fault came at
# and the job's step count. ROLLBACKS (default 1): the job must have rolled back at least that
# often; 0: not at all (a fault nothing has to recover from). TRAIN_STEPS (default 40): a longer
# job for a longer fault. A failed comparison counts in FAILURES (the test ends with `finish`).
training_fault_run() {
  local victim=$1 fault=$2 inject=$3 label=$4 rollbacks=${5:-1}
  local steps=${TRAIN_STEPS:-40} fault_at=12 at
  local train=(--corpus "$ROOT/tests/data/corpus/apache-2.0.txt" --corpus-bytes 8192 --steps "$steps" --seq-len 32
    --batch 8 --lr 3e-3 --seed 3 --bound 150)

  if [[ -z $SERVE_PID ]]; then
    cluster_up
    serve_start
  fi
  step "baseline training: $steps steps on the healthy cluster"
  load_py train --address "$API" --secret-file "$TMP/secret" --out "$TMP/train-baseline.json" "${train[@]}" ||
    die "the baseline training run failed"

  step "a new coordinator on the same nodes (fresh weights from the checkpoint)"
  serve_stop
  SERVE_STARTS=$(($(grep -c "^serving " "$TMP/serve.out") + 1)) serve_start "$SERVE_HOST"

  step "training again; $fault $victim at step $fault_at"
  rm -f "$TMP/progress"
  load_py train --address "$API" --secret-file "$TMP/secret" --out "$TMP/train-fault.json" \
    --progress "$TMP/progress" "${train[@]}" >"$TMP/load.out" 2>&1 {SAVED_OUT}>&- {SAVED_ERR}>&- &
  LOAD_PID=$!
  PIDS+=("$LOAD_PID")
  wait_progress $fault_at
  at=$(cut -d' ' -f1 "$TMP/progress")
  [[ $at -lt $steps ]] || die "harness: the job finished (step $at) before the fault could be injected"
  "$inject" "$victim"
  load_wait
  # shellcheck disable=SC2059  # the label is a format by design
  label=$(printf "$label" "$at" "$steps")
  load_py compare-train --baseline "$TMP/train-baseline.json" --run "$TMP/train-fault.json" \
    --label "$label" --fault-unix "$FAULT_UNIX" \
    --node "$victim" --coordinator-log "$TMP/serve.out" \
    "$( ((rollbacks > 0)) && echo --expect-rollbacks || echo --max-rollbacks)" "$rollbacks" ||
    FAILURES=$((FAILURES + 1))
}

finish() {
  if ((FAILURES > 0)); then
    echo "$FAILURES failure(s)" >&2
    [[ -n ${MOE_FAULT_LOGS:-} ]] && show_logs
    exit 1
  fi
  echo "ok"
  exit 0
}
