#!/usr/bin/env bash
# Secrets are never logged and /metrics exposes none, on a real cluster: a `moe node` and a
# coordinator (`moe serve --join-nodes`) whose config has a distinctive
# cluster secret, the control plane over TLS (cluster.tls) and the job API over TLS (api.tls),
# both keys encrypted with distinctive passphrases. The test joins the node (serve, cluster
# status), tries a join with a wrong secret, submits with the right secret (C++ and, when the
# project's venv has pycapnp, Python clients over TLS), with a wrong one and over plain TCP,
# scrapes every /metrics page, runs `moe plan` (text and --json), stops everything, then greps
# every log, every command's output, every metrics page and the processes' command lines for the
# secret, the wrong secrets and both passphrases: none may appear.
#
#   secrets_not_leaked.sh MOE_BINARY REPO_ROOT
# Exit 77 (skipped) without the openssl command (it makes the certificates, as
# docs/operations.md does).
set -u
MOE=$1
ROOT=$2
command -v openssl >/dev/null || { echo "SKIP: no openssl command"; exit 77; }
TMP=$(mktemp -d "${TMPDIR:-/tmp}/moe-secrets.XXXXXX") || exit 2
RUN="$TMP/run"
OUT="$TMP/out"  # everything any process printed, and every scraped page
mkdir -p "$OUT" "$TMP/tls"
SERVE_PID=
NODE_PID=
cleanup() {
  [[ -n $SERVE_PID ]] && kill -KILL "$SERVE_PID" 2>/dev/null
  [[ -n $NODE_PID ]] && kill -KILL -- "-$NODE_PID" 2>/dev/null
  rm -rf "$TMP"
}
trap cleanup EXIT
FAILURES=0
fail() {
  echo "FAIL: $*" >&2
  FAILURES=$((FAILURES + 1))
}

# Distinctive values: any occurrence in an output is a leak, not a coincidence.
TAG="$$${RANDOM}${RANDOM}"
SECRET="canary-cluster-secret-$TAG"
WRONG_JOIN="canary-wrong-join-secret-$TAG"
WRONG_SUBMIT="canary-wrong-submit-secret-$TAG"
NODE_PASS="canary-node-key-passphrase-$TAG"
API_PASS="canary-api-key-passphrase-$TAG"
CANARIES=("$SECRET" "$WRONG_JOIN" "$WRONG_SUBMIT" "$NODE_PASS" "$API_PASS")

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
BASE=
for base in $(seq 40000 83 49000); do
  ok=1
  for off in 0 1 2 10 11; do port_free $((base + off)) || { ok=0; break; }; done
  ((ok)) && { BASE=$base; break; }
done
[[ -n $BASE ]] || { echo "FAIL: no free ports" >&2; exit 1; }
API=127.0.0.1:$((BASE + 1))

# Certificates as docs/operations.md makes them: the cluster's CA and the node's certificate
# (key encrypted), the API's CA and the API server's certificate for localhost (key encrypted).
T="$TMP/tls"
make_ca() {  # NAME
  openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -sha256 -days 30 \
    -subj "/O=moe/CN=$1" -keyout "$T/$1.key" -out "$T/$1.pem" 2>/dev/null
}
make_cert() {  # CA NAME PASSPHRASE EXTFILE
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -passout "pass:$3" -subj "/O=moe/CN=$2" \
    -keyout "$T/$2.key" -out "$T/$2.csr" 2>/dev/null &&
    openssl x509 -req -in "$T/$2.csr" -CA "$T/$1.pem" -CAkey "$T/$1.key" -CAcreateserial -sha256 -days 30 \
      -extfile "$4" -out "$T/$2.pem" 2>/dev/null
}
printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n' >"$T/node.ext"
printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$T/api.ext"
make_ca cluster-ca && make_cert cluster-ca n0 "$NODE_PASS" "$T/node.ext" &&
  make_ca api-ca && make_cert api-ca api "$API_PASS" "$T/api.ext" ||
  { echo "FAIL: cannot make certificates" >&2; exit 1; }
grep -q "ENCRYPTED" "$T/n0.key" && grep -q "ENCRYPTED" "$T/api.key" || { echo "FAIL: the keys are not encrypted" >&2; exit 1; }

CONFIG="$TMP/cluster.yaml"
cat >"$CONFIG" <<YAML
cluster:
  name: secrets-test
  secret: $SECRET
  heartbeat_interval_ms: 100
  failure_timeout_ms: 2000
  tls: {certificate: tls/n0.pem, key: tls/n0.key, ca_file: tls/cluster-ca.pem, passphrase: $NODE_PASS}
api:
  tls: {certificate: tls/api.pem, key: tls/api.key, passphrase: $API_PASS}
nodes:
  - {name: n0, host: 127.0.0.1, control_port: $((BASE + 10)), metrics_port: $((BASE + 11)), devices: {cpu_slots: 2}, memory: 2GiB}
model: {path: $ROOT/tests/data/tiny-v3}
attention_shards: 1
expert_groups: {count: 2}
ports: {control: $BASE, api: $((BASE + 1)), metrics: $((BASE + 2))}
YAML
printf '%s\n' "$WRONG_JOIN" >"$TMP/wrong-join"
printf '%s\n' "$WRONG_SUBMIT" >"$TMP/wrong-submit"
printf '%s\n' "$SECRET" >"$TMP/secret"

# run NAME COMMAND...: stdout and stderr to $OUT/NAME.{out,err}; its exit status in RC.
RC=0
run() {
  local name=$1
  shift
  "$@" >"$OUT/$name.out" 2>"$OUT/$name.err"
  RC=$?
}
show() { cat "$OUT/$1.out" "$OUT/$1.err" >&2; }

run plan "$MOE" plan --config "$CONFIG"
((RC == 0)) || { fail "moe plan failed"; show plan; }
run plan-json "$MOE" plan --config "$CONFIG" --json
((RC == 0)) || { fail "moe plan --json failed"; show plan-json; }

# The node, its log kept here (`moe cluster down` removes the run dir with the logs it made).
setsid "$MOE" node --config "$CONFIG" --name n0 >"$OUT/n0.log" 2>&1 &
NODE_PID=$!
for _ in $(seq 600); do
  grep -q " up: cluster " "$OUT/n0.log" 2>/dev/null && break
  kill -0 "$NODE_PID" 2>/dev/null || break
  sleep 0.1
done
if ! grep -q " up: cluster " "$OUT/n0.log"; then
  fail "moe node did not come up"
  cat "$OUT/n0.log" >&2
  exit 1
fi

# A join with the wrong secret: refused (the node logs the refusal).
run status-wrong "$MOE" cluster status --config "$CONFIG" --run-dir "$RUN" --secret-file "$TMP/wrong-join" --call-timeout 5
((RC == 3)) || { fail "status with a wrong secret exited $RC, not 3"; show status-wrong; }

# A join with the right secret. (Before the coordinator joins: with cluster.tls, a status call
# while a coordinator is joined drops the coordinator's link to the node, a control-plane issue
# of its own, reported apart from this test.)
run status "$MOE" cluster status --config "$CONFIG" --run-dir "$RUN" --call-timeout 5
((RC == 0)) || { fail "status exited $RC"; show status; }

"$MOE" serve --config "$CONFIG" --join-nodes --join-timeout 60 >"$OUT/serve.out" 2>"$OUT/serve.err" &
SERVE_PID=$!
for _ in $(seq 600); do
  grep -q "^serving " "$OUT/serve.out" 2>/dev/null && break
  kill -0 "$SERVE_PID" 2>/dev/null || break
  sleep 0.1
done
if ! grep -q "^serving " "$OUT/serve.out"; then
  fail "moe serve did not come up"
  show serve
  exit 1
fi
grep -q "(API over TLS)" "$OUT/serve.out" || fail "moe serve does not say its API is TLS: $(cat "$OUT/serve.out")"

TLS_FLAGS=(--ca-file "$T/api-ca.pem" --server-name localhost)
run submit "$MOE" submit --address "$API" --secret-file "$TMP/secret" "${TLS_FLAGS[@]}" --prompt-ids 5,17,42 --max-new-tokens 6
((RC == 0)) || { fail "submit over TLS failed"; show submit; }
[[ $(wc -w <"$OUT/submit.out") -eq 6 ]] || fail "submit over TLS did not print 6 tokens: $(cat "$OUT/submit.out")"
run submit-stream "$MOE" submit --address "$API" --secret-file "$TMP/secret" "${TLS_FLAGS[@]}" --prompt-ids 9,8 \
  --max-new-tokens 4 --stream
((RC == 0)) || { fail "streaming submit over TLS failed"; show submit-stream; }
run submit-wrong "$MOE" submit --address "$API" --secret-file "$TMP/wrong-submit" "${TLS_FLAGS[@]}" --prompt-ids 5
((RC == 1)) && grep -q "unauthenticated" "$OUT/submit-wrong.err" ||
  { fail "a wrong secret over TLS was not refused as unauthenticated"; show submit-wrong; }
run submit-plain "$MOE" submit --address "$API" --secret-file "$TMP/secret" --prompt-ids 5
((RC == 1)) && grep -q "connect with TLS" "$OUT/submit-plain.err" ||
  { fail "a plain client of the TLS API got no clear error"; show submit-plain; }
run submit-other-ca "$MOE" submit --address "$API" --secret-file "$TMP/secret" --ca-file "$T/cluster-ca.pem" \
  --server-name localhost --prompt-ids 5
((RC == 1)) && grep -q "tls_failed\|not signed by a CA" "$OUT/submit-other-ca.err" ||
  { fail "a client trusting another CA got no clear error"; show submit-other-ca; }

PY="${MOE_VENV:-$ROOT/.venv}/bin/python"
if [[ -x $PY ]] && "$PY" -c "import capnp" 2>/dev/null; then
  PYTHONPATH="$ROOT/python" "$PY" - "$API" "$TMP/secret" "$TMP/wrong-submit" "$T/api-ca.pem" \
    >"$OUT/python.out" 2>"$OUT/python.err" <<'PYEOF'
import sys
import moe_client
address, secret_file, wrong_file, ca = sys.argv[1:5]
secret = open(secret_file).read().strip()
with moe_client.Client(address, secret, ca_file=ca) as c:
    events = []
    job = c.submit([5, 17, 42], 5, on_event=events.append)
    final = c.wait(job, timeout=120)
    assert final.state == "finished" and len(final.tokens) == 5, final
    assert [t for e in events for t in e.tokens] == final.tokens
try:
    moe_client.Client(address, open(wrong_file).read().strip(), ca_file=ca)
    raise SystemExit("a wrong secret was served")
except moe_client.Unauthenticated as e:
    print("wrong secret:", e)
print("python ok")
PYEOF
  grep -q "python ok" "$OUT/python.out" || { fail "the Python client over TLS failed"; show python; }
else
  echo "note: no project venv with pycapnp; the Python part was not run"
fi

# Every /metrics page: the coordinator's and the node's.
if command -v curl >/dev/null; then
  curl -sf "http://127.0.0.1:$((BASE + 2))/metrics" >"$OUT/metrics-coordinator.txt" || fail "cannot scrape the coordinator"
  curl -sf "http://127.0.0.1:$((BASE + 11))/metrics" >"$OUT/metrics-n0.txt" || fail "cannot scrape n0"
  grep -q '^moe_controller_requests_total' "$OUT/metrics-coordinator.txt" || fail "the coordinator's page lacks requests"
  [[ -s $OUT/metrics-n0.txt ]] || fail "n0's page is empty"
else
  echo "note: no curl; /metrics was not checked"
fi

# The processes' command lines (ps shows them to every user).
for pid in "$SERVE_PID" "$NODE_PID"; do
  tr '\0' ' ' <"/proc/$pid/cmdline" >>"$OUT/cmdlines.txt" 2>/dev/null
  echo >>"$OUT/cmdlines.txt"
done
grep -q " serve " "$OUT/cmdlines.txt" && grep -q " node " "$OUT/cmdlines.txt" ||
  fail "could not read the command lines: $(cat "$OUT/cmdlines.txt")"

kill -TERM "$SERVE_PID"
wait "$SERVE_PID"
rc=$?
SERVE_PID=
((rc == 0)) || fail "moe serve exited $rc on SIGTERM"
run down "$MOE" cluster down --config "$CONFIG" --run-dir "$RUN" --timeout 30
((RC == 0)) || { fail "cluster down failed"; show down; }
wait "$NODE_PID"
NODE_PID=

# The node logged the refused join (so its log was really written, and is checked below).
grep -qi "refused" "$OUT/n0.log" || fail "n0's log does not show the refused join: $(cat "$OUT/n0.log")"

for canary in "${CANARIES[@]}"; do
  if hits=$(grep -rlF -- "$canary" "$OUT"); then
    fail "leaked '$canary' in: $(tr '\n' ' ' <<<"$hits")"
    grep -rnF -- "$canary" "$OUT" | head -5 >&2
  fi
done
echo "checked $(find "$OUT" -type f | wc -l) files: $(cd "$OUT" && ls | tr '\n' ' ')"

if ((FAILURES > 0)); then
  echo "$FAILURES failure(s)" >&2
  exit 1
fi
echo "ok"
