# Sourced by the scripts: starts a throwaway redis-server on a free loopback
# port, with AOF, in a temporary directory (`$SWITCHYARD_REDIS_SERVER` or
# redis-server from PATH).
#
#   start_redis [EXTRA FLAGS...]
#
# Sets REDIS_PID, REDIS_PORT and REDIS_URL; stop_redis stops it (by PID) and
# removes its directory. Fails if it does not answer PING within 10 s.
REDIS_PIDS=()
REDIS_DIRS=()
stop_redis() {
  for pid in "${REDIS_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${REDIS_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "${REDIS_DIRS[@]}"
}
start_redis() {
  local dir port
  dir="$(mktemp -d)"
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  "${SWITCHYARD_REDIS_SERVER:-redis-server}" --port "$port" --bind 127.0.0.1 --save "" \
    --appendonly yes --dir "$dir" "$@" >"$dir/log" 2>&1 &
  REDIS_PID=$!
  REDIS_PIDS+=("$REDIS_PID")
  REDIS_DIRS+=("$dir")
  for _ in $(seq 1 100); do
    if [[ "$(redis-cli -p "$port" ping 2>/dev/null)" == PONG ]]; then
      REDIS_PORT="$port"
      REDIS_URL="redis://127.0.0.1:$port"
      return 0
    fi
    kill -0 "$REDIS_PID" 2>/dev/null || break
    sleep 0.1
  done
  echo "redis-server did not start:" >&2
  cat "$dir/log" >&2
  return 1
}
