#!/usr/bin/env bash
# `moe chaos` as a tool, without a cluster: its errors and exit codes, the proxy's corruption
# (seeded: the same seed flips the same bits), cuts and delay against an echo server, and
# `garbage` against a server that rejects everything and one that holds connections open.
#
#   chaos_cli.sh MOE_BINARY
set -u
MOE=$(realpath "$1")
# shellcheck source=../tools/wait_for_line.sh
source "$(dirname "${BASH_SOURCE[0]}")/../tools/wait_for_line.sh"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/moe-chaos-cli.XXXXXX") || exit 2
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  rm -rf "$TMP"
}
trap cleanup EXIT
FAILURES=0
fail() {
  echo "FAIL: $*" >&2
  FAILURES=$((FAILURES + 1))
}
# expect CODE PATTERN CMD...: exit status and a line of output.
expect() {
  local code=$1 pattern=$2
  shift 2
  local out rc
  out=$("$@" 2>&1)
  rc=$?
  [[ $rc -eq $code ]] || fail "$* exited $rc, not $code: $out"
  grep -qE -- "$pattern" <<<"$out" || fail "$*: no /$pattern/ in: $out"
}

cat >"$TMP/c.yaml" <<YAML
cluster: {name: chaos-cli-$$, secret: s}
nodes:
  - {name: n0, host: 127.0.0.1, devices: {cpu_slots: 1}, memory: 1GiB}
  - {name: far, host: 10.255.255.1, devices: {cpu_slots: 1}, memory: 1GiB}
model: {preset: tiny}
YAML

# --- kill / stop / cont ------------------------------------------------------------------------
expect 1 "no node named 'nope' \(nodes: n0, far\)" "$MOE" chaos kill --config "$TMP/c.yaml" --node nope --run-dir "$TMP/run"
expect 1 "node far runs on 10.255.255.1, not on this host" "$MOE" chaos stop --config "$TMP/c.yaml" --node far --run-dir "$TMP/run"
expect 1 "node n0: no pid file $TMP/run/n0.pid" "$MOE" chaos kill --config "$TMP/c.yaml" --node n0 --run-dir "$TMP/run"
mkdir -p "$TMP/run"
echo 999999999 >"$TMP/run/n0.pid"
expect 1 "node n0: pid 999999999 .* is not running" "$MOE" chaos kill --config "$TMP/c.yaml" --node n0 --run-dir "$TMP/run"
# A stand-in node: a session leader, as `moe cluster up` starts them.
# Started from a subshell so that it is not a job of this shell (no "Killed" notice from bash).
VICTIM=$(setsid bash -c 'sleep 60 </dev/null >/dev/null 2>&1 & echo $!')
PIDS+=("$VICTIM")
echo "$VICTIM" >"$TMP/run/n0.pid"
state() { ps -o stat= -p "$1" 2>/dev/null | cut -c1; }
# settles PID REGEX: whether the process's state matches within 5 s (a signal takes effect
# asynchronously; on a loaded host a continued process may still be R for a moment).
settles() {
  for _ in $(seq 50); do
    [[ $(state "$1") =~ $2 ]] && return 0
    sleep 0.1
  done
  return 1
}
expect 0 "SIGSTOP sent to node n0 \(pid $VICTIM" "$MOE" chaos stop --config "$TMP/c.yaml" --node n0 --run-dir "$TMP/run"
settles "$VICTIM" '^T$' || fail "after chaos stop the process is in state '$(state "$VICTIM")', not T"
expect 0 "SIGCONT sent" "$MOE" chaos cont --config "$TMP/c.yaml" --node n0 --run-dir "$TMP/run"
settles "$VICTIM" '^S$' || fail "after chaos cont the process is in state '$(state "$VICTIM")', not S"
expect 0 "[0-9T:.-]+Z \(unix [0-9]+\.[0-9]{6}\): SIGKILL sent to node n0" \
  "$MOE" chaos kill --config "$TMP/c.yaml" --node n0 --run-dir "$TMP/run"
settles "$VICTIM" '^Z?$' || fail "the process survived chaos kill"

# --- netem: argument checks and a missing namespace (exit 2: cannot be done here) ---------------
expect 2 "no network namespace 'moe-no-such-ns-$$'" "$MOE" chaos netem --netns "moe-no-such-ns-$$" --dev eth0 --delay 5
expect 1 "give --delay MS, --loss PCT" "$MOE" chaos netem --netns x --dev eth0
expect 1 "--loss 150 is not a percentage" "$MOE" chaos netem --netns x --dev eth0 --loss 150
"$MOE" chaos netem --netns x --dev eth0 --clear --delay 5 >/dev/null 2>&1
[[ $? -ge 100 ]] || fail "--clear with --delay is not a usage error"

# --- link (tbf and nftables, no netem): the same checks, and names that cannot reach nft -------
expect 2 "no network namespace 'moe-no-such-ns-$$'|no 'nft' command" \
  "$MOE" chaos link --netns "moe-no-such-ns-$$" --dev eth0 --loss 1
expect 1 "give --rate KBIT, --loss PCT" "$MOE" chaos link --netns x --dev eth0
expect 1 "--rate 1 is not a rate in \[8, 1e8\] kbit/s" "$MOE" chaos link --netns x --dev eth0 --rate 1
expect 1 "--loss -1 is not a percentage" "$MOE" chaos link --netns x --dev eth0 --loss -1
expect 1 "'eth0\"; flush ruleset' is not a network device name" \
  "$MOE" chaos link --netns x --dev 'eth0"; flush ruleset' --loss 1
"$MOE" chaos link --netns x --dev eth0 --clear --rate 100 >/dev/null 2>&1
[[ $? -ge 100 ]] || fail "--clear with --rate is not a usage error"

# --- proxy ------------------------------------------------------------------------------------
# An echo server on an ephemeral port (printed), until killed.
python3 -u - >"$TMP/echo.port" <<'PY' &
import socket, threading
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(16)
print(s.getsockname()[1], flush=True)
def serve(c):
    with c:
        while True:
            b = c.recv(65536)
            if not b: break
            c.sendall(b)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
PY
PIDS+=($!)
for _ in $(seq 50); do [[ -s $TMP/echo.port ]] && break; sleep 0.1; done
ECHO=127.0.0.1:$(cat "$TMP/echo.port")

# proxy NAME ARGS...: starts `moe chaos proxy`; sets PROXY (its address).
proxy() {
  local name=$1
  shift
  "$MOE" chaos proxy --listen 127.0.0.1:0 --to "$ECHO" "$@" >"$TMP/$name.out" 2>&1 &
  PIDS+=($!)
  PROXY=
  for _ in $(seq 50); do
    PROXY=$(sed -n 's/.*listening on \([^ ]*\) -> .*/\1/p' "$TMP/$name.out")
    [[ -n $PROXY ]] && return
    sleep 0.1
  done
  fail "proxy $name did not start: $(cat "$TMP/$name.out")"
}
# roundtrip ADDRESS: sends 20000 known bytes, prints what came back (hex digest, size, seconds).
roundtrip() {
  python3 - "$1" <<'PY'
import hashlib, socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
data = bytes((i * 7 + 3) % 256 for i in range(20000))
s = socket.create_connection((host, int(port)))
t0 = time.time()
s.sendall(data)
s.shutdown(socket.SHUT_WR)
got = b""
while True:
    b = s.recv(65536)
    if not b: break
    got += b
flips = sum(bin(a ^ b).count("1") for a, b in zip(data, got))
print(hashlib.sha1(got).hexdigest(), len(got), flips, f"{time.time() - t0:.3f}")
PY
}
proxy clean
read -r sum size flips _ < <(roundtrip "$PROXY")
[[ $size -eq 20000 && $flips -eq 0 ]] || fail "rate 0: got $size bytes with $flips flipped bits"
proxy seed5 --corrupt-rate 0.01 --seed 5
A=$(roundtrip "$PROXY")
proxy seed5again --corrupt-rate 0.01 --seed 5
B=$(roundtrip "$PROXY")
proxy seed6 --corrupt-rate 0.01 --seed 6
C=$(roundtrip "$PROXY")
read -r sum_a size_a flips_a _ <<<"$A"
read -r sum_b _ _ _ <<<"$B"
read -r sum_c _ _ _ <<<"$C"
# 20000 bytes each way at 1% flip about 400 bits; a flipped bit may be flipped back on the way home.
[[ $size_a -eq 20000 && $flips_a -gt 150 && $flips_a -lt 700 ]] || fail "rate 0.01: $size_a bytes, $flips_a bits flipped"
[[ $sum_a == "$sum_b" ]] || fail "the same seed flipped different bits ($A / $B)"
[[ $sum_a != "$sum_c" ]] || fail "different seeds flipped the same bits"
# The proxy writes its connection report after closing the sockets, so a client may finish first.
wait_for_line "$TMP/seed5.out" "conn 1 from .*: closed by the client; to server 20000 B \([0-9]+ bits flipped\)" ||
  fail "the proxy's connection report: $(cat "$TMP/seed5.out")"
proxy drop --drop-after 5000
read -r _ size _ _ < <(roundtrip "$PROXY")
[[ $size -lt 5000 ]] || fail "--drop-after 5000: $size bytes came back"
wait_for_line "$TMP/drop.out" "cut after 5000 bytes" || fail "--drop-after not reported: $(cat "$TMP/drop.out")"
proxy slow --delay-ms 300
read -r _ size _ secs < <(roundtrip "$PROXY")
[[ $size -eq 20000 ]] || fail "--delay-ms: $size bytes came back"
awk -v s="$secs" 'BEGIN { exit !(s >= 0.6) }' || fail "--delay-ms 300 both ways took only $secs s"

# --- garbage ----------------------------------------------------------------------------------
# A server that closes every connection as soon as anything arrives, and one that holds them.
python3 -u - >"$TMP/strict.port" <<'PY' &
import socket, threading
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(16)
print(s.getsockname()[1], flush=True)
def serve(c):
    with c:
        c.settimeout(0.5)
        try: c.recv(1)
        except OSError: pass
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
PY
PIDS+=($!)
python3 -u - >"$TMP/lax.port" <<'PY' &
import socket, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(16)
print(s.getsockname()[1], flush=True)
held = []
while True:
    c, _ = s.accept()
    held.append(c)  # never read, never closed
PY
PIDS+=($!)
for f in strict lax; do for _ in $(seq 50); do [[ -s $TMP/$f.port ]] && break; sleep 0.1; done; done
STRICT=127.0.0.1:$(cat "$TMP/strict.port")
LAX=127.0.0.1:$(cat "$TMP/lax.port")
# The strict server answers nothing to a bare Bootstrap either: only connections are checked.
"$MOE" chaos garbage --address "$STRICT" --kind all --timeout 0.5 >"$TMP/strict.out" 2>&1
rc=$?
[[ $(grep -c '\[rejected\]' "$TMP/strict.out") -eq 6 ]] ||
  fail "the strict server should reject all 6 frames: $(cat "$TMP/strict.out")"
grep -q "wrong-version #1 .*call 1: no answer" "$TMP/strict.out" || fail "wrong-version report: $(cat "$TMP/strict.out")"
[[ $rc -eq 3 ]] || fail "a server that answers no Bootstrap must fail the probe (exit 3), got $rc"
expect 3 "NOT REJECTED" "$MOE" chaos garbage --address "$LAX" --kind truncated --timeout 0.3
expect 3 "cannot connect to 127.0.0.1:1" "$MOE" chaos garbage --address 127.0.0.1:1 --kind random --timeout 0.3
expect 1 "--kind bogus: expected truncated" "$MOE" chaos garbage --address "$LAX" --kind bogus
expect 1 "'nonsense' is not HOST:PORT" "$MOE" chaos garbage --address nonsense

if ((FAILURES > 0)); then
  echo "$FAILURES failure(s)" >&2
  exit 1
fi
echo "ok"
