# Sourced by the scripts: starts a broker on ephemeral loopback ports.
#
#   start_broker BIN [FLAGS...]
#
# Sets BROKER_PID, CLIENT_ADDR and API_ADDR, and stops the broker on exit
# (every broker started, when called more than once: their PIDs collect in
# BROKER_PIDS). Fails (with the broker's log) if it does not report its
# addresses in 10 s.
BROKER_PIDS=()
BROKER_LOGS=()
stop_brokers() {
  for pid in "${BROKER_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -f "${BROKER_LOGS[@]}"
}
start_broker() {
  local bin="$1"
  shift
  BROKER_LOG="$(mktemp)"
  "$bin" --listen 127.0.0.1:0 --api-listen 127.0.0.1:0 --log-format json "$@" 2>"$BROKER_LOG" &
  BROKER_PID=$!
  BROKER_PIDS+=("$BROKER_PID")
  BROKER_LOGS+=("$BROKER_LOG")
  trap 'stop_brokers; type stop_redis >/dev/null 2>&1 && stop_redis' EXIT
  local line=""
  for _ in $(seq 1 100); do
    line="$(grep -m1 '"switchyard listening"' "$BROKER_LOG" || true)"
    [[ -n "$line" ]] && break
    kill -0 "$BROKER_PID" 2>/dev/null || break
    sleep 0.1
  done
  if [[ -z "$line" ]]; then
    echo "broker did not start:" >&2
    cat "$BROKER_LOG" >&2
    return 1
  fi
  CLIENT_ADDR="$(sed -E 's/.*"client":"([^"]+)".*/\1/' <<<"$line")"
  API_ADDR="$(sed -E 's/.*"api":"([^"]+)".*/\1/' <<<"$line")"
}
