# Sourced by the integration scripts: what a process that does not exit is doing, so a hang seen
# once on a CI machine can be read from its log instead of reproduced.
#
#   dump_stacks PID   every thread's backtrace on stderr (gdb when installed, else each thread's
#                     kernel wait channel from /proc); never fails, at most about 60 s.

dump_stacks() {
  local pid=$1 task
  kill -0 "$pid" 2>/dev/null || return 0
  echo "----- threads of pid $pid ($(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-200)) -----" >&2
  if command -v gdb >/dev/null; then
    # -batch detaches at the end, so the process carries on and is stopped as before.
    timeout 60 gdb -batch -nx -p "$pid" -ex 'set pagination off' -ex 'thread apply all bt' 2>&1 |
      grep -vE '^\[New LWP|^Reading symbols|^\(No debugging symbols|^warning: .*(debug|separate)' >&2
    return 0
  fi
  for task in /proc/"$pid"/task/*; do
    echo "  thread ${task##*/} $(cat "$task/comm" 2>/dev/null): wchan $(cat "$task/wchan" 2>/dev/null)" >&2
  done
  return 0
}
