# Sourced by the integration and fault scripts: a bounded wait for a line that a live background
# process writes to its log. A one-shot grep races with that process (a proxy logs a connection
# after closing its sockets; a node logs "up ... (TLS)" after it answers), so such checks poll.
#
#   wait_for_line FILE REGEX [SECONDS]   0 once FILE has a line matching the extended REGEX,
#                                        1 after SECONDS (default 10) without one

wait_for_line() {
  local file=$1 regex=$2 tries=$((${3:-10} * 10)) i
  for ((i = 0; i < tries; ++i)); do
    grep -qE -- "$regex" "$file" 2>/dev/null && return 0
    sleep 0.1
  done
  grep -qE -- "$regex" "$file" 2>/dev/null
}
