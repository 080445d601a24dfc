#!/usr/bin/env bash
# promtool (Debian's prometheus package) on monitoring/prometheus: the alert rules parse
# (`check rules`), fire when they should and only then (`test rules alerts_test.yml`), and the
# committed scrape config and one make_scrape_config.py writes for a cluster config are valid
# Prometheus configs (`check config`, which also loads their rule files).
# Skipped (77) without promtool.
#
#   promtool_check.sh REPO_ROOT
set -u
ROOT=$1
PROMTOOL=${PROMTOOL:-$(command -v promtool)}
if [[ -z $PROMTOOL ]]; then
  echo "SKIP: promtool is not installed (Debian: apt-get install prometheus; or set PROMTOOL)"
  exit 77
fi
DIR="$ROOT/monitoring/prometheus"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/moe-promtool.XXXXXX") || exit 2
trap 'rm -rf "$TMP"' EXIT
FAILURES=0
run() {  # WHAT COMMAND...
  local what=$1
  shift
  echo "==> $what"
  if ! "$@"; then
    echo "FAIL: $what" >&2
    FAILURES=$((FAILURES + 1))
  fi
}

run "promtool check rules alerts.yml" "$PROMTOOL" check rules "$DIR/alerts.yml"
# Relative rule_files resolve against the test file's directory: run it where it lives.
run "promtool test rules alerts_test.yml" bash -c 'cd "$1" && "$2" test rules alerts_test.yml' _ "$DIR" "$PROMTOOL"
run "promtool check config scrape.yml" "$PROMTOOL" check config "$DIR/scrape.yml"

# A config written for a two-node cluster (YAML's JSON form: no PyYAML needed), its rule file
# beside it as the script's default expects.
cat >"$TMP/cluster.json" <<'EOF'
{"cluster": {"name": "t", "secret": "s"},
 "nodes": [{"name": "n0", "host": "10.0.0.10", "devices": {"gpus": 8}, "gpu_memory": "80GiB"},
           {"name": "n1", "host": "10.0.0.11", "metrics_port": 9200, "devices": {"gpus": 8}, "gpu_memory": "80GiB"}],
 "model": {"preset": "tiny"}}
EOF
cp "$DIR/alerts.yml" "$TMP/"
run "make_scrape_config.py for a cluster config" \
  python3 "$DIR/make_scrape_config.py" "$TMP/cluster.json" --coordinator 10.0.0.5 -o "$TMP/prometheus.yml"
run "promtool check config on what it wrote" "$PROMTOOL" check config "$TMP/prometheus.yml"
for target in 10.0.0.5:7102 10.0.0.10:7112 10.0.0.11:9200; do
  grep -q "\"$target\"" "$TMP/prometheus.yml" || { echo "FAIL: no target $target in the written config" >&2; FAILURES=$((FAILURES + 1)); }
done

if ((FAILURES > 0)); then
  echo "$FAILURES failure(s)" >&2
  exit 1
fi
echo "ok"
