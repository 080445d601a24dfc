#!/usr/bin/env bash
# Fault h: the node links over TLS (cluster.tls) while peers come and go, under steady load.
#
# The cluster of fault_kill_attention.sh (three nodes; n1 holds attention shard 1 only) with
# certificates from one CA. While ~300 greedy requests run: `moe cluster status` with the
# cluster's config (a short-lived peer that connects to every node and exits), the same with a
# certificate from another CA (refused by every node), then SIGKILL of n1. A failed or vanished
# TLS peer must cost its own link only: CAF 0.17's sessions let one connection's OpenSSL error
# close the next healthy one (runtime/openssl_error_queue.hpp), which took the coordinator's
# links to every node down. Expected: only n1 goes down; its shard's requests are replayed on
# shard 0, every request finishes with the baseline's tokens (or fails with a deadline error),
# none is lost. Skipped (77) without the openssl command.
#
#   fault_kill_tls.sh MOE_BINARY REPO_ROOT
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh" "$1" "$2" kill_tls

command -v openssl >/dev/null || skip "no openssl command (certificates are made with it)"
# A CA and a certificate for the nodes; a stranger's from another CA.
source "$ROOT/tests/tools/tls_certs.sh" "$TMP/tls"
# shellcheck source=../tools/wait_for_line.sh
source "$ROOT/tests/tools/wait_for_line.sh"
tls_make_ca cluster-ca && tls_make_cert cluster-ca node && tls_make_ca other-ca && tls_make_cert other-ca stranger ||
  die "cannot make certificates with openssl"

write_config() {  # FILE CERT CA
  {
    cluster_yaml 100 3000
    printf '  tls: {certificate: tls/%s.pem, key: tls/%s.key, ca_file: tls/%s.pem}\n' "$2" "$2" "$3"
    printf 'nodes:\n'
    node_yaml 0 1
    node_yaml 1 1
    node_yaml 2 1
    model_yaml
    printf 'attention_shards: 2\nexpert_groups: 2\n'
  } >"$1"
}
CONFIG=$TMP/cluster.yaml
write_config "$CONFIG" node cluster-ca
write_config "$TMP/stranger.yaml" stranger other-ca

VICTIM=n1
held=$(holdings $VICTIM)
echo "    placement: n0: $(holdings n0); n1: $held; n2: $(holdings n2)"
[[ $held == attention:* && $held != *group:* ]] ||
  die "the placement changed: $VICTIM holds '$held', not attention shards only (adapt the config)"

cluster_up
# `cluster up` returns once n0 answers; n0 logs its "up: ... (TLS)" line only after it publishes
# its control endpoint, so that line may land a moment after the answer.
wait_for_line "$RUN/n0.log" "\(TLS\)" || die "n0 does not say it runs TLS: $(cat "$RUN/n0.log")"
serve_start
baseline
load_start --requests 600
wait_progress 100
step "moe cluster status over TLS (a peer that connects to every node, then exits)"
"$MOE" cluster status --config "$CONFIG" --run-dir "$RUN" >"$TMP/status.out" 2>&1 ||
  fail "cluster status over TLS exited $?: $(cat "$TMP/status.out")"
sed 's/^/    /' "$TMP/status.out"
step "moe cluster status with another CA's certificate (refused by every node)"
"$MOE" cluster status --config "$TMP/stranger.yaml" --run-dir "$RUN" --call-timeout 5 >"$TMP/stranger.out" 2>&1
rc=$?
[[ $rc -eq 3 ]] || fail "cluster status with a stranger's certificate exited $rc, not 3: $(cat "$TMP/stranger.out")"
wait_progress 250
step "SIGKILL $VICTIM (attention only) under load"
chaos kill --config "$CONFIG" --node $VICTIM --run-dir "$RUN"
load_wait
# Only the victim's link may go: a peer's failure must not take the others with it.
others=$(grep -E "node n[0-9]+ .* -> down" "$TMP/serve.out" | grep -v "node $VICTIM ")
[[ -z $others ]] || fail "links to other nodes went down with a TLS peer's failure: $others"
grep -qE "node $VICTIM .* -> down" "$TMP/serve.out" || fail "the coordinator never saw $VICTIM go down"
compare --label "TLS links: cluster status (ok, refused), then SIGKILL of an attention-only node" \
  --fault-unix "$FAULT_UNIX" --node $VICTIM --allow-failed deadline
finish
