#!/usr/bin/env bash
# Contracts of `moe submit` as a user sees them: a real `moe` process against a real API server
# (moe_api_test_server: the api_server in front of the scripted fake controller, whose job for
# prompt P generates P.last+1, P.last+2, ...). Only stdout, stderr and exit status are checked.
#
#   submit_contracts.sh MOE_BINARY API_TEST_SERVER_BINARY
set -u
if [[ $# -ne 2 ]]; then
  echo "usage: $0 MOE_BINARY API_TEST_SERVER_BINARY" >&2
  exit 2
fi
MOE=$1
SERVER=$2
SECRET="submit contracts secret"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/moe-submit-contracts.XXXXXX") || exit 2

# The server runs until its stdin closes: hold a fifo open on fd 3 and close it at exit.
mkfifo "$TMP/server.in"
"$SERVER" --secret "$SECRET" --fail-token 777 <"$TMP/server.in" >"$TMP/server.out" 2>&1 &
SERVER_PID=$!
exec 3>"$TMP/server.in"
TLS_SERVER_PID=
cleanup() {
  exec 3>&- 4>&-
  wait "$SERVER_PID" 2>/dev/null
  [[ -n $TLS_SERVER_PID ]] && wait "$TLS_SERVER_PID" 2>/dev/null
  rm -rf "$TMP"
}
trap cleanup EXIT
for _ in $(seq 100); do
  grep -q '^port ' "$TMP/server.out" 2>/dev/null && break
  sleep 0.1
done
PORT=$(awk '/^port /{print $2}' "$TMP/server.out")
if [[ -z $PORT ]]; then
  echo "FAIL: the API test server did not start: $(cat "$TMP/server.out")" >&2
  exit 1
fi
ADDR=127.0.0.1:$PORT

FAILURES=0
RC=0
moe() {
  LAST_CMD="moe $*"
  "$MOE" "$@" >"$TMP/out" 2>"$TMP/err"
  RC=$?
}
fail() {
  echo "FAIL: $*" >&2
  echo "  command: $LAST_CMD (exit status $RC)" >&2
  echo "  stdout: $(head -c 1000 "$TMP/out")" >&2
  echo "  stderr: $(head -c 1000 "$TMP/err")" >&2
  FAILURES=$((FAILURES + 1))
}
expect_stdout() {
  if ((RC != 0)) || [[ $(cat "$TMP/out") != "$1" ]]; then fail "expected stdout '$1'"; fi
}
# expect_error NEEDLE...: exit 1, "moe submit: error:" and every needle on stderr, no crash.
expect_error() {
  if ((RC != 1)); then fail "expected exit status 1"; return; fi
  grep -qF "moe submit: error:" "$TMP/err" || fail "no 'moe submit: error:' line"
  local n
  for n in "$@"; do grep -qF -- "$n" "$TMP/err" || fail "stderr does not mention '$n'"; done
}

moe submit --address "$ADDR" --secret "$SECRET" --prompt-ids 5,17,42 --max-new-tokens 5
expect_stdout "43 44 45 46 47"

MOE_CLUSTER_SECRET=$SECRET moe submit --address "$ADDR" --prompt-ids 10 --max-new-tokens 9 \
  --stop-ids 13 --stream
expect_stdout "11 12 13"

echo "$SECRET" >"$TMP/secret"
moe submit --address "$ADDR" --secret-file "$TMP/secret" --prompt-ids 1 --max-new-tokens 2 \
  --temperature 0.5 --top-p 0.9 --top-k 5 --seed 3
expect_stdout "2 3"

moe submit --address "$ADDR" --secret wrong --prompt-ids 5
expect_error "unauthenticated"
grep -qF "wrong" "$TMP/err" && fail "the given secret was echoed"

env -u MOE_CLUSTER_SECRET "$MOE" submit --address "$ADDR" --prompt-ids 5 >"$TMP/out" 2>"$TMP/err"
RC=$?
LAST_CMD="moe submit (no secret)"
expect_error "MOE_CLUSTER_SECRET"

for bad in "" "5,,6" "x" "-1" "99999999999"; do
  moe submit --address "$ADDR" --secret "$SECRET" --prompt-ids "$bad"
  expect_error "--prompt-ids"
done

# Refused by the flag's own check, before any connection (the server refuses it too: topP).
moe submit --address "$ADDR" --secret "$SECRET" --prompt-ids 5 --top-p 0
if ((RC == 0 || RC >= 128)) || ! grep -qF -- "--top-p: 0 is not a number in (0, 1]" "$TMP/err"; then
  fail "expected --top-p 0 refused, saying why"
fi

moe submit --address "$ADDR" --secret "$SECRET" --prompt-ids 5 --max-new-tokens 5000
expect_error "invalid_request" "4096"

moe submit --address "$ADDR" --secret "$SECRET" --prompt-ids 777,1 --max-new-tokens 3
expect_error "failed" "scripted failure"

moe submit --address 127.0.0.1:1 --secret "$SECRET" --prompt-ids 5
expect_error "cannot connect" "refused"

moe submit --address no-port --secret "$SECRET" --prompt-ids 5
expect_error "HOST:PORT"

# Over TLS: a second server with a certificate made at run time (--make-test-certs) for
# 127.0.0.1 and localhost, signed by ca.pem.
CERTS="$TMP/certs"
if ! "$SERVER" --make-test-certs "$CERTS" >"$TMP/certs.out" 2>&1; then
  echo "FAIL: cannot make test certificates: $(cat "$TMP/certs.out")" >&2
  exit 1
fi
mkfifo "$TMP/tls-server.in"
"$SERVER" --secret "$SECRET" --tls-cert "$CERTS/server.pem" --tls-key "$CERTS/server.key" \
  <"$TMP/tls-server.in" >"$TMP/tls-server.out" 2>"$TMP/tls-server.err" &
TLS_SERVER_PID=$!
exec 4>"$TMP/tls-server.in"
for _ in $(seq 100); do
  grep -q '^port ' "$TMP/tls-server.out" 2>/dev/null && break
  sleep 0.1
done
TLS_ADDR=127.0.0.1:$(awk '/^port /{print $2}' "$TMP/tls-server.out")

moe submit --address "$TLS_ADDR" --secret "$SECRET" --ca-file "$CERTS/ca.pem" --server-name localhost \
  --prompt-ids 5,17,42 --max-new-tokens 5
expect_stdout "43 44 45 46 47"

moe submit --address "$TLS_ADDR" --secret "$SECRET" --ca-file "$CERTS/ca.pem" --server-name localhost \
  --prompt-ids 10 --max-new-tokens 3 --stream
expect_stdout "11 12 13"

moe submit --address "$TLS_ADDR" --secret wrong --ca-file "$CERTS/ca.pem" --server-name localhost --prompt-ids 5
expect_error "unauthenticated"

moe submit --address "$TLS_ADDR" --secret "$SECRET" --ca-file "$CERTS/other-ca.pem" --server-name localhost \
  --prompt-ids 5
expect_error "not signed by a CA this client trusts"

moe submit --address "$TLS_ADDR" --secret "$SECRET" --ca-file "$CERTS/ca.pem" --server-name api.example.org \
  --prompt-ids 5
expect_error "does not name 'api.example.org'" "--server-name"

moe submit --address "$TLS_ADDR" --secret "$SECRET" --prompt-ids 5
expect_error "cannot log in" "connect with TLS" "--ca-file"

moe submit --address "$ADDR" --secret "$SECRET" --ca-file "$CERTS/ca.pem" --server-name localhost --prompt-ids 5
expect_error "does not speak TLS"

moe submit --address "$TLS_ADDR" --secret "$SECRET" --ca-file "$CERTS/ca.pem" --cert "$CERTS/client.pem" \
  --prompt-ids 5
expect_error "--cert and --key"

exec 4>&-
wait "$TLS_SERVER_PID" 2>/dev/null
grep -q "TLS handshake with 127.0.0.1:[0-9]* failed" "$TMP/tls-server.err" ||
  { LAST_CMD="(the TLS server's log)"; fail "the TLS server did not log the failed handshakes: $(cat "$TMP/tls-server.err")"; }
grep -qF "$SECRET" "$TMP/tls-server.err" "$TMP/tls-server.out" &&
  { LAST_CMD="(the TLS server's log)"; fail "the TLS server logged the secret"; }

if ((FAILURES > 0)); then
  echo "$FAILURES contract(s) of moe submit broken" >&2
  exit 1
fi
echo "moe submit: every contract holds"
