# Shared by the GPU-machine scripts (source it): a deadline and time-boxed steps.
# The sourcing script sets START (date +%s at its start), DEADLINE_S, and STEP_DIR (where each step's output goes).

left() { echo $((DEADLINE_S - ($(date +%s) - START))); }

step() {  # step NAME NEED_S LIMIT_S CMD...: run CMD if NEED_S seconds are left, under min(LIMIT_S, time left - 5)
  local name=$1 need=$2 limit=$3
  shift 3
  if [ "$(left)" -lt "$need" ]; then echo "== skip $name: $(left)s left, it needs $need"; return 1; fi
  [ "$limit" -gt $(( $(left) - 5 )) ] && limit=$(( $(left) - 5 ))
  echo "== step $name (timeout ${limit}s, $(left)s left)"
  timeout "$limit" "$@" 2>&1 | tee "$STEP_DIR/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "== step $name exit $rc after $(( $(date +%s) - START ))s"
  return "$rc"
}
