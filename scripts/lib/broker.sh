# Sourced by the scripts: starts a broker on ephemeral loopback ports.
#
#   start_broker BIN [FLAGS...]
#
# Sets BROKER_PID, CLIENT_ADDR and API_ADDR, and stops the broker on exit.
# Fails (with the broker's log) if it does not report its addresses in 10 s.
start_broker() {
  local bin="$1"
  shift
  BROKER_LOG="$(mktemp)"
  "$bin" --listen 127.0.0.1:0 --api-listen 127.0.0.1:0 --log-format json "$@" 2>"$BROKER_LOG" &
  BROKER_PID=$!
  trap 'kill "$BROKER_PID" 2>/dev/null || true; rm -f "$BROKER_LOG"' EXIT
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
