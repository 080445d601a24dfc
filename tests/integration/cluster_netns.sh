#!/usr/bin/env bash
# The 3-process cluster of `moe demo --processes 3` with every node on a host of its own: two
# network namespaces joined by a bridge in the root namespace, as three machines on one subnet.
#
#   root namespace   bridge moebr<PID> 10.213.X.1/24   `moe serve --join-nodes` (coordinator, API)
#   moe-<PID>-a      veth 10.213.X.2/24                `moe node --name n0`
#   moe-<PID>-b      veth 10.213.X.3/24                `moe node --name n1`
#
# The coordinator joins both nodes, places the attention shard (with its router) on n0 and the
# expert groups on n0 and n1, and serves the job API; `moe submit` must reproduce the golden
# greedy tokens of tests/data/tiny-v3 exactly, and n1's /metrics must count data-plane bytes
# (activations that crossed between namespaces over UCX). Needs root and `ip` (iproute2);
# exits 77 (skipped) where network namespaces cannot be made, e.g. an unprivileged container.
#
#   cluster_netns.sh MOE_BINARY REPO_ROOT
set -u
if [[ $# -ne 2 ]]; then
  echo "usage: $0 MOE_BINARY REPO_ROOT" >&2
  exit 2
fi
MOE=$(realpath "$1")
ROOT=$(realpath "$2")
MODEL=$ROOT/tests/data/tiny-v3
GOLDEN=$MODEL/golden.safetensors
# shellcheck source=../tools/stacks.sh
source "$ROOT/tests/tools/stacks.sh"

step() { echo "==> $*"; }
skip() {
  echo "SKIP: $* (this test needs root, iproute2 and permission to make network namespaces)" >&2
  exit 77
}

# ---------------------------------------------------------------------------------------------
# Skips before anything is made.
[[ $(id -u) -eq 0 ]] || skip "not root"
command -v ip >/dev/null || skip "no 'ip' command (iproute2)"
command -v python3 >/dev/null || skip "no python3 (reads the golden tokens, scrapes /metrics)"
[[ -x $MOE ]] || { echo "FAIL: $MOE is not executable" >&2; exit 1; }

# Names unique to this run (interface names: at most 15 characters; a PID has at most 7 digits).
NS_A=moe-$$-a
NS_B=moe-$$-b
BR=moebr$$
VETH_A=moe$$a   # root-namespace ends, on the bridge
VETH_B=moe$$b
PEER_A=moe$$ai  # the ends moved into the namespaces
PEER_B=moe$$bi

# The script's own stdout and stderr, for cleanup: a signal can arrive while a command's output is
# redirected to a file (e.g. a scrape into $TMP), and the trap runs with that redirection.
exec {SAVED_OUT}>&1 {SAVED_ERR}>&2

TMP=
STARTED_NS=()    # namespaces this run made (deleted by cleanup)
STARTED_LINKS=() # root-namespace links this run made
PIDS=()          # every process this run started in the background
SERVE_PID=
N0_PID=
N1_PID=
CLEANED=0

show_logs() {
  [[ -n $TMP && -d $TMP ]] || return
  local f
  for f in "$TMP"/n0.log "$TMP"/n1.log "$TMP"/serve.out "$TMP"/serve.err; do
    [[ -f $f ]] || continue
    echo "----- $(basename "$f") -----" >&2
    tail -n 200 "$f" >&2
  done
  echo "-----" >&2
}

# Runs on every exit (success, failure, SIGINT, SIGTERM): kills what it started, removes what it
# made, and says what it could not remove.
cleanup() {
  local rc=$?
  ((CLEANED)) && return
  CLEANED=1
  trap '' INT TERM
  exec 1>&"$SAVED_OUT" 2>&"$SAVED_ERR"
  [[ -n $SIGNAL ]] && echo "$SIGNAL received: cleaning up" >&2
  local pid ns link
  # Processes: TERM first (a node or serve stops cleanly), KILL whatever is left after 3 s.
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for _ in $(seq 30); do
    local alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; done
  # Anything else still inside our namespaces (a child a node might have made).
  for ns in "${STARTED_NS[@]}"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
  done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  for link in "${STARTED_LINKS[@]}"; do ip link del "$link" 2>/dev/null; done
  for ns in "${STARTED_NS[@]}"; do ip netns del "$ns" 2>/dev/null; done
  for ns in "${STARTED_NS[@]}"; do
    ip netns list 2>/dev/null | grep -qw -- "$ns" && echo "WARNING: namespace $ns left behind" >&2
  done
  for link in "${STARTED_LINKS[@]}"; do
    ip link show "$link" >/dev/null 2>&1 && echo "WARNING: link $link left behind" >&2
  done
  [[ -n $TMP ]] && rm -rf "$TMP"
  ((${#STARTED_NS[@]} > 0)) && echo "cleaned up: processes, namespaces $NS_A $NS_B, bridge $BR and veths"
  exit "$rc"
}
trap cleanup EXIT
SIGNAL=
trap 'SIGNAL=SIGINT; exit 130' INT
trap 'SIGNAL=SIGTERM; exit 143' TERM

FAILURES=0
fail() {
  echo "FAIL: $*" >&2
  FAILURES=$((FAILURES + 1))
}
die() {
  echo "FAIL: $*" >&2
  show_logs
  exit 1
}

# ---------------------------------------------------------------------------------------------
# Names already taken are leftovers of a run with the same PID that was SIGKILLed (no trap
# runs then): a failure to report, not a reason to skip.
for ns in "$NS_A" "$NS_B"; do
  ip netns list 2>/dev/null | grep -qw -- "$ns" &&
    die "namespace $ns already exists (left by a killed run? ip netns del $ns)"
done
for link in "$BR" "$VETH_A" "$VETH_B" "$PEER_A" "$PEER_B"; do
  ip link show "$link" >/dev/null 2>&1 && die "link $link already exists (left by a killed run? ip link del $link)"
done

step "making network namespaces $NS_A and $NS_B"
if ! out=$(ip netns add "$NS_A" 2>&1); then
  skip "cannot make a network namespace: ip netns add: $out"
fi
STARTED_NS+=("$NS_A")
if ! out=$(ip netns exec "$NS_A" true 2>&1); then
  skip "cannot enter a network namespace: ip netns exec: $out"
fi
ip netns add "$NS_B" || die "ip netns add $NS_B failed"
STARTED_NS+=("$NS_B")

step "bridge $BR with veths $VETH_A/$PEER_A and $VETH_B/$PEER_B"
if ! out=$(ip link add "$BR" type bridge 2>&1); then
  skip "cannot make a bridge: ip link add type bridge: $out"
fi
STARTED_LINKS+=("$BR")
if ! out=$(ip link add "$VETH_A" type veth peer name "$PEER_A" 2>&1); then
  skip "cannot make a veth pair: ip link add type veth: $out"
fi
STARTED_LINKS+=("$VETH_A")
ip link add "$VETH_B" type veth peer name "$PEER_B" || die "cannot make veth $VETH_B"
STARTED_LINKS+=("$VETH_B")

# A /24 in 10.213.0.0/16 chosen from the PID, moved on while this host already has an address
# in it (another run, or a real network). Chosen and taken under a lock on /run/netns (made by
# `ip netns add`), so two runs at once never take the same subnet.
command -v flock >/dev/null && exec {LOCK}</run/netns && flock -w 30 "$LOCK"
X=
for i in $(seq 0 249); do
  x=$(((($$ + i) % 250) + 1))
  ip -4 -o addr show 2>/dev/null | grep -q " 10\.213\.$x\." || { X=$x; break; }
done
[[ -n $X ]] || die "no free 10.213.X.0/24 subnet on this host"
NET=10.213.$X
COORD=$NET.1
HOST_A=$NET.2
HOST_B=$NET.3
ip addr add "$COORD/24" dev "$BR" || die "cannot give $BR the address $COORD/24"
[[ -n ${LOCK:-} ]] && exec {LOCK}<&-

step "addresses: $BR $COORD/24 (coordinator), $NS_A $HOST_A (n0), $NS_B $HOST_B (n1)"
{
  ip link set "$BR" up &&
    ip link set "$VETH_A" master "$BR" && ip link set "$VETH_A" up &&
    ip link set "$VETH_B" master "$BR" && ip link set "$VETH_B" up &&
    ip link set "$PEER_A" netns "$NS_A" &&
    ip link set "$PEER_B" netns "$NS_B" &&
    ip -n "$NS_A" link set lo up && ip -n "$NS_B" link set lo up &&
    ip -n "$NS_A" addr add "$HOST_A/24" dev "$PEER_A" && ip -n "$NS_A" link set "$PEER_A" up &&
    ip -n "$NS_B" addr add "$HOST_B/24" dev "$PEER_B" && ip -n "$NS_B" link set "$PEER_B" up
} || die "cannot configure the bridge, veths or namespace addresses"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/moe-cluster-netns.XXXXXX") || die "mktemp failed"
export MOE_MODEL_CACHE="$TMP/cache"  # model.path is used; nothing should land in ~/.cache

# ---------------------------------------------------------------------------------------------
SECRET=netns-test-secret-$$
CONFIG=$TMP/cluster.yaml
step "writing $CONFIG (n0 on $HOST_A, n1 on $HOST_B, model $MODEL)"
# Nodes on different hosts may share port numbers; the coordinator's own ports (ports.api,
# ports.metrics) are overridden with 0 (ephemeral) on the command line below, because the root
# namespace is shared with whatever else runs on this machine.
cat >"$CONFIG" <<EOF
cluster:
  name: netns-test
  secret: $SECRET
  heartbeat_interval_ms: 200
  failure_timeout_ms: 5000
nodes:
  - name: n0
    host: $HOST_A
    control_port: 7110
    metrics_port: 7111
    devices: {cpu_slots: 2}
    memory: 2GiB
  - name: n1
    host: $HOST_B
    control_port: 7110
    metrics_port: 7111
    devices: {cpu_slots: 2}
    memory: 2GiB
model:
  path: $MODEL
attention_shards: 1
expert_groups: 3
ports: {control: 7100, api: 7101, metrics: 7102}
EOF

# The golden greedy prompt and tokens (written by Hugging Face transformers), read with the
# standard library only, as tests/cli/run_contracts.sh does.
read_ids() {  # TENSOR SEP
  python3 - "$GOLDEN" "$1" "$2" <<'PY'
import array, json, struct, sys
path, name, sep = sys.argv[1:]
with open(path, "rb") as f:
    blob = f.read()
(n,) = struct.unpack("<Q", blob[:8])
entry = json.loads(blob[8:8 + n])[name]
assert entry["dtype"] == "I64" and entry["shape"][0] == 1, entry
begin, end = entry["data_offsets"]
print(sep.join(str(v) for v in array.array("q", blob[8 + n + begin:8 + n + end])))
PY
}
PROMPT=$(read_ids greedy_prompt ,) || die "cannot read greedy_prompt from $GOLDEN"
WANT=$(read_ids greedy_tokens " ") || die "cannot read greedy_tokens from $GOLDEN"
NUM_NEW=$(wc -w <<<"$WANT")

# ---------------------------------------------------------------------------------------------
# UCX: only the tcp transport. The namespaces share the host's IPC namespace, /dev/shm and host
# name, so UCX takes the three processes for one host and could use shared memory (sm: sysv,
# posix, cma) between them, and the bytes would never cross the veths. Today the planes' default
# ("tcp,sm") runs over tcp anyway, because peer-failure detection (UCP_ERR_HANDLING_MODE_PEER)
# rules sm out (docs/data_plane.md); UCX_TLS=tcp keeps this test about separate hosts if that
# changes. UCX_NET_DEVICES needs no setting: inside a namespace UCX sees only lo and the veth,
# and from the root namespace the default (all devices) reaches the nodes through the bridge.
export UCX_TLS=tcp

start_node() {  # NS NAME
  ip netns exec "$1" "$MOE" node --config "$CONFIG" --name "$2" >"$TMP/$2.log" 2>&1 \
    {SAVED_OUT}>&- {SAVED_ERR}>&- &
}
step "starting node n0 in $NS_A and node n1 in $NS_B (ip netns exec ... moe node)"
start_node "$NS_A" n0
N0_PID=$!  # `ip netns exec` execs the command: this is the node process itself
PIDS+=("$N0_PID")
start_node "$NS_B" n1
N1_PID=$!
PIDS+=("$N1_PID")

# A node is up when its log says so; it logs its endpoints on that line.
for name in n0 n1; do
  for _ in $(seq 300); do
    grep -q "up: cluster" "$TMP/$name.log" 2>/dev/null && break
    kill -0 "$N0_PID" 2>/dev/null && kill -0 "$N1_PID" 2>/dev/null || break
    sleep 0.1
  done
  line=$(grep "up: cluster" "$TMP/$name.log" 2>/dev/null) || die "node $name did not come up"
  echo "    $name: ${line#*] }"
done

# Connectivity the cluster needs, checked with plain TCP so a broken network is named as such:
# root namespace -> each node's control port, and n0 -> n1 across the bridge.
tcp_open() {  # [NS] HOST PORT
  if [[ $# -eq 3 ]]; then
    ip netns exec "$1" timeout 3 bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null
  else
    timeout 3 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null
  fi
}
step "checking the network: coordinator -> n0, coordinator -> n1, n0 -> n1"
tcp_open "$HOST_A" 7110 && tcp_open "$HOST_B" 7110 && tcp_open "$NS_A" "$HOST_B" 7110 ||
  die "the namespaces cannot reach each other over $BR (with bridge netfilter on," \
    "an iptables FORWARD policy of DROP blocks bridged traffic:" \
    "net.bridge.bridge-nf-call-iptables=$(cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null || echo n/a))"

# ---------------------------------------------------------------------------------------------
step "starting moe serve --join-nodes in the root namespace (API on $COORD)"
"$MOE" serve --config "$CONFIG" --join-nodes --host "$COORD" --api-port 0 --metrics-port 0 \
  --join-timeout 60 >"$TMP/serve.out" 2>"$TMP/serve.err" {SAVED_OUT}>&- {SAVED_ERR}>&- &
SERVE_PID=$!
PIDS+=("$SERVE_PID")
for _ in $(seq 900); do
  grep -q "^serving " "$TMP/serve.out" 2>/dev/null && break
  kill -0 "$SERVE_PID" 2>/dev/null || break
  sleep 0.1
done
LINE=$(grep "^serving " "$TMP/serve.out") || die "moe serve did not come up"
PORT=$(sed -E 's/.*API on [^:]+:([0-9]+),.*/\1/' <<<"$LINE")
METRICS=$(sed -E 's/.*metrics at ([^ ]+).*/\1/' <<<"$LINE")
echo "    $LINE"
for _ in $(seq 50); do tcp_open "$COORD" "$PORT" && break; sleep 0.1; done
tcp_open "$COORD" "$PORT" || die "the API at $COORD:$PORT does not accept connections"

# Placement: the table moe serve printed (ACTOR DEVICE MEMORY HOLDS).
step "checking the placement spans both nodes"
sed -n '/^placement v/,/^serving /p' "$TMP/serve.out" | grep -v '^serving ' | sed 's/^/    /'
attention_dev=$(awk '$1 == "attention" && $2 == "0" {print $3}' "$TMP/serve.out")
group_devs=$(awk '$1 == "expert" && $2 == "group" {print $4}' "$TMP/serve.out" | sort -u | tr '\n' ' ')
[[ $attention_dev == n0/* ]] || fail "attention 0 is on '$attention_dev', not on n0"
[[ $(awk '$1 == "expert" && $2 == "group"' "$TMP/serve.out" | wc -l) -eq 3 ]] ||
  fail "the table does not list 3 expert groups"
grep -q "n0/" <<<"$group_devs" || fail "no expert group on n0 (groups on: $group_devs)"
grep -q "n1/" <<<"$group_devs" || fail "no expert group on n1 (groups on: $group_devs)"

# ---------------------------------------------------------------------------------------------
step "moe submit the golden greedy prompt $PROMPT (max $NUM_NEW new tokens)"
got=$("$MOE" submit --address "$COORD:$PORT" --secret "$SECRET" --prompt-ids "$PROMPT" \
  --max-new-tokens "$NUM_NEW" 2>"$TMP/submit.err")
rc=$?
echo "    want: $WANT"
echo "    got:  $got"
[[ $rc -eq 0 ]] || fail "moe submit exited $rc: $(cat "$TMP/submit.err")"
[[ $got == "$WANT" ]] || fail "the cluster's greedy tokens differ from the golden ones"

# Two more prompts against the reference engine in this process (as serve_submit.sh checks).
for prompt in 5,17,42 100,200,300,400,500,7,8; do
  want=$("$MOE" run --model "$MODEL" --prompt-ids "$prompt" --max-new-tokens 12)
  got=$("$MOE" submit --address "$COORD:$PORT" --secret "$SECRET" --prompt-ids "$prompt" \
    --max-new-tokens 12 2>"$TMP/submit.err")
  rc=$?
  echo "    prompt $prompt -> $got"
  [[ $rc -eq 0 ]] || fail "moe submit exited $rc for $prompt: $(cat "$TMP/submit.err")"
  [[ $got == "$want" ]] || fail "prompt $prompt: submit gave '$got', moe run gave '$want'"
done

# ---------------------------------------------------------------------------------------------
# /metrics of each node, scraped from inside its namespace (as a Prometheus there would).
scrape() {  # NS URL
  ip netns exec "$1" python3 -c '
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "$2"
}
sample() {  # FILE SERIES: the value of one series, empty when absent
  awk -v s="$2" '$1 == s {print $2}' "$1"
}
step "checking the data plane counted bytes on both nodes (scraped inside their namespaces)"
scrape "$NS_B" "http://$HOST_B:7111/metrics" >"$TMP/n1.metrics" || fail "cannot scrape n1's /metrics"
scrape "$NS_A" "http://$HOST_A:7111/metrics" >"$TMP/n0.metrics" || fail "cannot scrape n0's /metrics"
for name in n0 n1; do
  recv=$(sample "$TMP/$name.metrics" 'moe_data_plane_bytes_total{direction="receive"}')
  sent=$(sample "$TMP/$name.metrics" 'moe_data_plane_bytes_total{direction="send"}')
  echo "    $name: moe_data_plane_bytes_total receive=${recv:-absent} send=${sent:-absent}"
  awk -v v="${recv:-0}" 'BEGIN {exit !(v > 0)}' || fail "$name: no data-plane bytes received"
  awk -v v="${sent:-0}" 'BEGIN {exit !(v > 0)}' || fail "$name: no data-plane bytes sent"
  grep -q '^moe_node_up 1' "$TMP/$name.metrics" || fail "$name: no moe_node_up 1"
done
if command -v curl >/dev/null; then
  curl -sf "$METRICS" >"$TMP/serve.metrics" || fail "cannot scrape the coordinator's $METRICS"
  grep -q '^moe_controller_requests_total{outcome="finished"} [1-9]' "$TMP/serve.metrics" ||
    fail "the coordinator's metrics lack finished requests"
fi

# Who talks to whom (information for the reader, not checked): established TCP connections in
# each namespace with the bytes each carried (ss -i). Port 7110 is CAF's control plane (BASP); the
# others are UCX's. CAF 0.17 does not connect two nodes to each other on its own (automatic
# connections are off by default), so actor messages between n0 and n1 go through the
# coordinator; the UCX data planes connect directly.
step "TCP connections in each namespace (local -> peer: bytes sent / received)"
for ns in "$NS_A" "$NS_B"; do
  echo "    $ns:"
  ip netns exec "$ns" ss -tniH state established 2>/dev/null | awk '
    /^[^ \t]/ { if (conn != "") print conn; conn = "      " $3 " -> " $4; next }
    {
      sent = "?"; recv = "?"
      for (i = 1; i <= NF; i++) {
        if ($i ~ /^bytes_sent:/) sent = substr($i, 12)
        if ($i ~ /^bytes_received:/) recv = substr($i, 16)
      }
      conn = conn ": " sent " / " recv
    }
    END { if (conn != "") print conn }' | sort
done
if [[ -f $TMP/serve.metrics ]]; then
  echo "    coordinator: moe_data_plane_bytes_total" \
    "receive=$(sample "$TMP/serve.metrics" 'moe_data_plane_bytes_total{direction="receive"}')" \
    "send=$(sample "$TMP/serve.metrics" 'moe_data_plane_bytes_total{direction="send"}')"
fi

# ---------------------------------------------------------------------------------------------
# Waits at most SECONDS for a child to exit; its exit status, or 255 when it is still running
# (cleanup then kills it, after its threads' backtraces went to stderr). Bounded, so a hung process
# fails the test well before ctest's timeout.
wait_exit() {  # PID SECONDS
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    kill -0 "$1" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$1" 2>/dev/null; then
    dump_stacks "$1"
    return 255
  fi
  wait "$1"
}
step "stopping moe serve (SIGTERM), then the nodes (SIGTERM)"
kill -TERM "$SERVE_PID"
wait_exit "$SERVE_PID" 30
rc=$?
[[ $rc -eq 0 ]] || fail "moe serve exited $rc on SIGTERM (255: still running after 30 s)"
grep -q "stopped" "$TMP/serve.out" || fail "moe serve did not report a clean stop"
kill -TERM "$N0_PID" "$N1_PID"
for name in n0 n1; do
  pid=$N0_PID
  [[ $name == n1 ]] && pid=$N1_PID
  wait_exit "$pid" 30
  rc=$?
  [[ $rc -eq 0 ]] || fail "node $name exited $rc on SIGTERM (255: still running after 30 s)"
done

if ((FAILURES > 0)); then
  echo "$FAILURES failure(s)" >&2
  show_logs
  exit 1
fi
echo "ok"
