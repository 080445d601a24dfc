#!/usr/bin/env bash
# `moe cluster up` for nodes on other hosts goes through ssh. A stand-in for ssh (it checks the
# arguments ssh would get and runs the remote command here) takes the place of the real one, and
# a node whose host is this machine's own non-loopback address counts as remote. Then a
# coordinator (`moe serve --join-nodes`) serves tiny-v3's golden tokens from the nodes started
# that way, and `moe cluster down` stops them.
#   cluster_ssh.sh MOE_BINARY REPO_ROOT
set -u
MOE=$1
ROOT=$2
ADDR=$(ip -4 -o addr show scope global 2>/dev/null | awk '{split($4, a, "/"); print a[1]; exit}')
if [[ -z $ADDR ]]; then
  echo "SKIP: no non-loopback IPv4 address here to stand for a remote host" >&2
  exit 77
fi
TMP=$(mktemp -d "${TMPDIR:-/tmp}/moe-cluster-ssh.XXXXXX") || exit 2
SERVE_PID=
cleanup() {
  [[ -n $SERVE_PID ]] && kill -KILL "$SERVE_PID" 2>/dev/null
  for f in "$TMP"/run/*.pid; do [[ -f $f ]] && kill -KILL -- "-$(cat "$f")" 2>/dev/null; done
  rm -rf "$TMP"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; for f in "$TMP"/run/*.log "$TMP"/serve.log "$TMP"/ssh.log; do [[ -f $f ]] && { echo "--- $f"; cat "$f"; }; done; exit 1; }

# The stand-in: `ssh -n -o BatchMode=yes HOST COMMAND` as moe calls it; logs and runs COMMAND.
cat > "$TMP/ssh" <<'SSH'
#!/usr/bin/env bash
[[ $1 == -n && $2 == -o && $3 == BatchMode=yes && $# -eq 5 ]] || { echo "unexpected ssh arguments: $*" >&2; exit 255; }
echo "ssh to $4: $5" >> "$(dirname "$0")/ssh.log"
exec bash -c "$5"
SSH
chmod +x "$TMP/ssh"

# Free on the address the nodes bind as well as on loopback (a node left by another run holds
# ADDR's port, which a loopback probe does not see).
port_free() {
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && ! (exec 3<>"/dev/tcp/$ADDR/$1") 2>/dev/null
}
BASE=
for base in $(seq 30011 89 39000); do
  ok=1
  for off in 0 1 2 10 11 20 21; do port_free $((base + off)) || { ok=0; break; }; done
  ((ok)) && { BASE=$base; break; }
done
[[ -n $BASE ]] || { echo "no free ports" >&2; exit 2; }
cat > "$TMP/cluster.yaml" <<YAML
cluster: {name: ssh-test, secret: ssh-test-secret, heartbeat_interval_ms: 200, failure_timeout_ms: 3000}
nodes:
  - {name: n0, host: $ADDR, control_port: $((BASE + 10)), metrics_port: $((BASE + 11)), devices: {cpu_slots: 2}, memory: 2GiB}
  - {name: n1, host: $ADDR, control_port: $((BASE + 20)), metrics_port: $((BASE + 21)), devices: {cpu_slots: 2}, memory: 2GiB}
model: {path: $ROOT/tests/data/tiny-v3}
attention_shards: 1
expert_groups: {count: 3}
ports: {control: $BASE, api: $((BASE + 1)), metrics: $((BASE + 2))}
YAML

echo "==> moe cluster up (nodes on $ADDR, through the ssh stand-in)"
"$MOE" cluster up --config "$TMP/cluster.yaml" --run-dir "$TMP/run" --ssh "$TMP/ssh" --remote-moe "$MOE" \
  --timeout 60 || fail "cluster up"
[[ $(grep -c "^ssh to $ADDR: " "$TMP/ssh.log") -eq 2 ]] || fail "expected two ssh calls"
grep -q " node --config $TMP/cluster.yaml --name n1" "$TMP/ssh.log" || fail "the remote command is not moe node"

echo "==> moe serve --join-nodes --host $ADDR"
"$MOE" serve --config "$TMP/cluster.yaml" --join-nodes --host "$ADDR" --join-timeout 60 > "$TMP/serve.log" 2>&1 &
SERVE_PID=$!
for _ in $(seq 1 300); do grep -q "^serving " "$TMP/serve.log" && break; sleep 0.2; done
grep -q "^serving " "$TMP/serve.log" || fail "serve did not come up"

GOLDEN=$(python3 - "$ROOT/tests/data/tiny-v3/golden.safetensors" <<'PY'
import json, struct, sys
raw = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
head = json.loads(raw[8:8 + n])
def ids(name):
    t = head[name]; a, b = t["data_offsets"]
    return [str(v) for v in struct.unpack("<%dq" % ((b - a) // 8), raw[8 + n + a:8 + n + b])]
print(",".join(ids("greedy_prompt")), " ".join(ids("greedy_tokens")))
PY
) || fail "cannot read the golden tokens"
PROMPT=${GOLDEN%% *}
WANT=${GOLDEN#* }
COUNT=$(wc -w <<< "$WANT")
GOT=$("$MOE" submit --address "$ADDR:$((BASE + 1))" --secret ssh-test-secret --prompt-ids "$PROMPT" \
  --max-new-tokens "$COUNT") || fail "submit"
[[ $GOT == "$WANT" ]] || fail "golden tokens: want '$WANT', got '$GOT'"
echo "    golden tokens reproduced: $GOT"

kill -TERM "$SERVE_PID"; wait "$SERVE_PID"; SERVE_PID=
echo "==> moe cluster down"
"$MOE" cluster down --config "$TMP/cluster.yaml" --run-dir "$TMP/run" --timeout 30 || fail "cluster down"
[[ ! -d $TMP/run ]] || fail "the run dir is still there"
# The nodes are remote to `moe cluster down` (no pid files): it must have seen them go.
for port in $((BASE + 10)) $((BASE + 20)); do
  port_free "$port" || fail "a node still listens on $ADDR:$port after cluster down"
done
echo "ok"
