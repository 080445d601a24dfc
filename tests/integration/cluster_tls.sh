#!/usr/bin/env bash
# The control plane over TLS as an operator sets it up: certificates made with the openssl
# commands of docs/operations.md, `moe cluster up` starting a node whose config has cluster.tls,
# `moe cluster status` with the same config (up, exit 0), with a plain config and with a
# certificate from another CA (not up, exit 3; the node keeps serving), a config whose key file
# is missing (exit 1, the key named), then `down`.
#
#   cluster_tls.sh MOE_BINARY
# Exit 77 (skipped) without the openssl command.
set -u
MOE=$1
command -v openssl >/dev/null || { echo "SKIP: no openssl command"; exit 77; }
TMP=$(mktemp -d "${TMPDIR:-/tmp}/moe-cluster-tls.XXXXXX") || exit 2
RUN="$TMP/run"
cleanup() {
  for f in "$RUN"/*.pid; do
    [[ -f $f ]] && kill -KILL -- "-$(cat "$f")" 2>/dev/null
  done
  rm -rf "$TMP"
}
trap cleanup EXIT
FAILURES=0
fail() {
  echo "FAIL: $*" >&2
  FAILURES=$((FAILURES + 1))
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
BASE=
for base in $(seq 30000 89 39000); do
  ok=1
  for off in 0 1 10 11 12; do port_free $((base + off)) || { ok=0; break; }; done
  ((ok)) && { BASE=$base; break; }
done
[[ -n $BASE ]] || { echo "FAIL: no free ports" >&2; exit 1; }

# A CA and a node certificate, as docs/operations.md makes them.
source "$(dirname "${BASH_SOURCE[0]}")/../tools/tls_certs.sh" "$TMP/tls"
# shellcheck source=../tools/wait_for_line.sh
source "$(dirname "${BASH_SOURCE[0]}")/../tools/wait_for_line.sh"
tls_make_ca cluster-ca && tls_make_cert cluster-ca n0 && tls_make_ca other-ca && tls_make_cert other-ca stranger ||
  { echo "FAIL: cannot make certificates" >&2; exit 1; }

write_config() {  # FILE TLS-LINES
  {
    printf 'cluster:\n  name: tls-test\n  secret: right-secret\n  heartbeat_interval_ms: 100\n  failure_timeout_ms: 1000\n'
    printf '%s' "$2"
    printf 'nodes:\n'
    printf '  - {name: n0, host: 127.0.0.1, control_port: %s, metrics_port: %s, devices: {cpu_slots: 1}, memory: 1GiB}\n' \
      $((BASE + 10)) $((BASE + 11))
    printf 'model: {preset: tiny}\nports: {control: %s, api: %s, metrics: %s}\n' $BASE $((BASE + 1)) $((BASE + 12))
  } >"$1"
}
# Relative paths: relative to the config file's directory.
write_config "$TMP/tls.yaml" $'  tls: {certificate: tls/n0.pem, key: tls/n0.key, ca_file: tls/cluster-ca.pem}\n'
write_config "$TMP/plain.yaml" ""
write_config "$TMP/stranger.yaml" $'  tls: {certificate: tls/stranger.pem, key: tls/stranger.key, ca_file: tls/other-ca.pem}\n'
write_config "$TMP/nokey.yaml" $'  tls: {certificate: tls/n0.pem, key: tls/missing.key, ca_file: tls/cluster-ca.pem}\n'

if ! "$MOE" cluster up --config "$TMP/tls.yaml" --run-dir "$RUN" --timeout 60 >"$TMP/up.out" 2>&1; then
  fail "cluster up over TLS failed: $(cat "$TMP/up.out")"
  cat "$RUN"/*.log >&2
  exit 1
fi
# `cluster up` returns once n0 answers; n0 logs its "up: ... (TLS)" line only after it publishes
# its control endpoint, so that line may land a moment after the answer.
wait_for_line "$RUN/n0.log" "\(TLS\)" || fail "n0's log does not say TLS: $(cat "$RUN/n0.log")"

"$MOE" cluster status --config "$TMP/tls.yaml" --run-dir "$RUN" >"$TMP/status.out" 2>&1
rc=$?
cat "$TMP/status.out"
[[ $rc -eq 0 ]] || fail "status over TLS exited $rc"
grep -qE '^n0 +127\.0\.0\.1:[0-9]+ +up ' "$TMP/status.out" || fail "status over TLS does not show n0 up"

for who in plain stranger; do
  "$MOE" cluster status --config "$TMP/$who.yaml" --run-dir "$RUN" --call-timeout 5 >"$TMP/$who.out" 2>&1
  rc=$?
  cat "$TMP/$who.out"
  [[ $rc -eq 3 ]] || fail "status with the $who config exited $rc, not 3"
  grep -qE '^n0 .* up ' "$TMP/$who.out" && fail "the $who config got an answer from a TLS node"
done

"$MOE" cluster status --config "$TMP/tls.yaml" --run-dir "$RUN" >"$TMP/status2.out" 2>&1 ||
  fail "n0 stopped serving after refusing peers: $(cat "$TMP/status2.out" "$RUN/n0.log")"

"$MOE" cluster status --config "$TMP/nokey.yaml" --run-dir "$RUN" >"$TMP/nokey.out" 2>&1
rc=$?
[[ $rc -eq 1 ]] || fail "a missing key file exited $rc, not 1"
grep -q "nokey.yaml:.*cluster.tls.key: cannot read .*missing.key" "$TMP/nokey.out" ||
  fail "missing key not named: $(cat "$TMP/nokey.out")"

"$MOE" cluster down --config "$TMP/tls.yaml" --run-dir "$RUN" >"$TMP/down.out" 2>&1 || fail "down failed: $(cat "$TMP/down.out")"
grep -q "shut down on request" "$TMP/down.out" || fail "n0 not shut down over TLS: $(cat "$TMP/down.out")"

if ((FAILURES > 0)); then
  echo "$FAILURES failure(s)" >&2
  exit 1
fi
echo "ok"
