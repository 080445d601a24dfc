#!/usr/bin/env bash
# `moe serve` and `moe submit` as two shells would run them, against `moe run`: a real serving
# process from deploy/local.yaml (ephemeral ports), the C++ and the Python clients, then a clean
# stop on SIGTERM. Greedy tokens through the cluster must equal the reference engine's.
# ENGINE picks what serves: actors (the actor graph, the default), reference (two whole-model
# shards of the CPU reference engine: `moe serve --engine reference`) or gpu-f32 (the GPU engine
# in f32, one shard, compared with `moe run --engine gpu --gpu-dtype f32`; run on a GPU machine by
# scripts/gpu/device_checks.sh). With whole-model shards, a real Prometheus (when installed)
# scrapes the serving process under a steady load, and the Grafana dashboard's Serving and
# Engine shards rows must return data through its HTTP API (tests/integration/
# prometheus_dashboard.py; the actor graph's rows are integration.prometheus_dashboard's).
#
#   serve_submit.sh MOE_BINARY REPO_ROOT [ENGINE]
set -u
MOE=$1
ROOT=$(cd "$2" && pwd)
ENGINE=${3:-actors}
case $ENGINE in
  actors) SERVE_ARGS=() RUN_ARGS=() ;;
  reference) SERVE_ARGS=(--engine reference --engine-shards 2) RUN_ARGS=() ;;
  gpu-f32) SERVE_ARGS=(--engine gpu --gpu-dtype f32 --engine-shards 1) RUN_ARGS=(--engine gpu --gpu-dtype f32) ;;
  *) echo "serve_submit.sh: unknown engine '$ENGINE' (actors, reference, gpu-f32)" >&2; exit 2 ;;
esac
TMP=$(mktemp -d "${TMPDIR:-/tmp}/moe-serve-submit.XXXXXX") || exit 2
SERVE_PID=
PROM_PID=
LOAD_PID=
cleanup() {
  for pid in $LOAD_PID $SERVE_PID $PROM_PID; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null
      wait "$pid" 2>/dev/null
    fi
  done
  rm -rf "$TMP"
}
trap cleanup EXIT
FAILURES=0
fail() {
  echo "FAIL: $*" >&2
  FAILURES=$((FAILURES + 1))
}

export MOE_MODEL_CACHE="$TMP/cache"
SECRET=change-me-local-demo
"$MOE" serve --config "$ROOT/deploy/local.yaml" --api-port 0 --metrics-port 0 "${SERVE_ARGS[@]}" \
  >"$TMP/serve.out" 2>"$TMP/serve.err" &
SERVE_PID=$!
for _ in $(seq 300); do
  grep -q "^serving " "$TMP/serve.out" 2>/dev/null && break
  kill -0 "$SERVE_PID" 2>/dev/null || break
  sleep 0.1
done
LINE=$(grep "^serving " "$TMP/serve.out")
if [[ -z $LINE ]]; then
  echo "FAIL: moe serve did not come up" >&2
  cat "$TMP/serve.out" "$TMP/serve.err" >&2
  exit 1
fi
PORT=$(sed -E 's/.*API on [^:]+:([0-9]+),.*/\1/' <<<"$LINE")
MODEL=$(sed -E 's/.*\(model ([^)]+)\).*/\1/' <<<"$LINE")
METRICS=$(sed -E 's/.*metrics at ([^ ]+).*/\1/' <<<"$LINE")
echo "serve: port $PORT, model $MODEL, metrics $METRICS"

HELPER="$ROOT/tests/integration/prometheus_dashboard.py"
PROMETHEUS=${PROMETHEUS:-$(command -v prometheus)}
PROM=
if [[ $ENGINE != actors ]]; then
  if [[ -n $PROMETHEUS ]] && command -v python3 >/dev/null; then
    PROM_PORT=$(python3 "$HELPER" free-ports 1)
    cat >"$TMP/prometheus.yml" <<EOF
global: {scrape_interval: 1s, evaluation_interval: 1s}
rule_files: ["$ROOT/monitoring/prometheus/alerts.yml"]
scrape_configs:
  - job_name: moe-runtime
    static_configs: [{targets: ["$(sed -E 's#^[a-z]+://([^/]+)/.*#\1#' <<<"$METRICS")"]}]
EOF
    "$PROMETHEUS" --config.file="$TMP/prometheus.yml" --storage.tsdb.path="$TMP/tsdb" \
      --web.listen-address="127.0.0.1:$PROM_PORT" >"$TMP/prometheus.log" 2>&1 &
    PROM_PID=$!
    PROM="http://127.0.0.1:$PROM_PORT"
    python3 "$HELPER" wait "$PROM" --targets 1 --timeout 60 ||
      fail "Prometheus does not scrape moe serve: $(tail -n 20 "$TMP/prometheus.log")"
  else
    echo "note: prometheus is not installed; the dashboard's Engine shards row was not checked"
  fi
fi

for prompt in 5,17,42 462,30,311,358,271,451,176,144 1 100,200,300,400,500,7,8; do
  want=$("$MOE" run --model "$MODEL" --prompt-ids "$prompt" --max-new-tokens 12 "${RUN_ARGS[@]}")
  got=$("$MOE" submit --address "127.0.0.1:$PORT" --secret "$SECRET" --prompt-ids "$prompt" \
        --max-new-tokens 12 2>"$TMP/submit.err")
  [[ $? -eq 0 ]] || fail "moe submit failed for $prompt: $(cat "$TMP/submit.err")"
  [[ $got == "$want" ]] || fail "prompt $prompt: submit gave '$got', run gave '$want'"
done

# A wrong secret gets an error, not service.
if "$MOE" submit --address "127.0.0.1:$PORT" --secret wrong --prompt-ids 5 --max-new-tokens 2 \
     >/dev/null 2>"$TMP/bad.err"; then
  fail "a wrong secret was served"
fi
grep -qi "unauthenticated" "$TMP/bad.err" || fail "wrong secret: unclear error: $(cat "$TMP/bad.err")"

# The Python client against the same running cluster (skipped without the project's venv).
PY="${MOE_VENV:-$ROOT/.venv}/bin/python"
if [[ -x $PY ]] && "$PY" -c "import capnp" 2>/dev/null; then
  want=$("$MOE" run --model "$MODEL" --prompt-ids 9,99,199 --max-new-tokens 10 "${RUN_ARGS[@]}")
  got=$(PYTHONPATH="$ROOT/python" "$PY" - "$PORT" "$SECRET" <<'PYEOF'
import sys
from moe_client import Client
with Client(f"127.0.0.1:{sys.argv[1]}", sys.argv[2]) as c:
    print(" ".join(str(t) for t in c.generate([9, 99, 199], max_new_tokens=10)))
    d = c.describe()
    assert d.name == "local-demo", d.name
PYEOF
)
  [[ $got == "$want" ]] || fail "python client gave '$got', moe run gave '$want'"
else
  echo "note: no project venv with pycapnp; the Python part was not run"
fi

if [[ -n $PROM ]]; then
  # A steady load while the queries run: the rate() panels need tokens inside their window.
  (while [[ ! -e $TMP/load.stop ]]; do
    "$MOE" submit --address "127.0.0.1:$PORT" --secret "$SECRET" --prompt-ids 3,1,4,1,5 \
      --max-new-tokens 8 >/dev/null 2>&1 || sleep 0.2
  done) &
  LOAD_PID=$!
  python3 "$HELPER" check "$PROM" "$ROOT/monitoring/grafana/moe-runtime.json" \
    "$ROOT/monitoring/prometheus/alerts.yml" --timeout 60 --only-row Serving \
    --only-row "Engine shards" || fail "the dashboard's Serving or Engine shards row has no data"
  touch "$TMP/load.stop"
  wait "$LOAD_PID"
  LOAD_PID=
fi

# The metrics endpoint of the serving process counts what was just served.
if command -v curl >/dev/null; then
  curl -sf "$METRICS" >"$TMP/metrics" || fail "cannot scrape $METRICS"
  grep -q '^moe_controller_requests_total{outcome="finished"} [1-9]' "$TMP/metrics" ||
    fail "metrics lack finished requests"
  if [[ $ENGINE == actors ]]; then
    grep -q '^moe_router_tokens_routed_total{' "$TMP/metrics" || fail "metrics lack routed tokens"
  else
    # Whole-model shards: no routers; the shards' own mailbox gauges, one per shard.
    grep -q '^moe_router_tokens_routed_total{' "$TMP/metrics" && fail "engine shards exported router metrics"
    grep -q "whole-model engine shard" "$TMP/serve.out" || fail "moe serve did not say it serves engine shards"
    grep -q '^moe_actor_mailbox_depth{actor="attention",id="0"}' "$TMP/metrics" ||
      fail "metrics lack the engine shard's mailbox gauge"
    grep -q '^moe_engine_tokens_total{phase="decode",shard="0"} [1-9]' "$TMP/metrics" ||
      fail "metrics lack shard 0's decoded tokens"
    grep -q '^moe_attention_free_cache_blocks{shard="0"} [1-9]' "$TMP/metrics" ||
      fail "metrics lack shard 0's free cache blocks"
  fi
fi

if [[ -n $PROM_PID ]]; then
  kill -TERM "$PROM_PID"
  wait "$PROM_PID"
  PROM_PID=
fi
kill -TERM "$SERVE_PID"
wait "$SERVE_PID"
rc=$?
SERVE_PID=
[[ $rc -eq 0 ]] || fail "moe serve exited $rc on SIGTERM"
grep -q "stopped" "$TMP/serve.out" || fail "moe serve did not report a clean stop"

if ((FAILURES > 0)); then
  echo "$FAILURES failure(s)" >&2
  exit 1
fi
echo "ok"
