# Sourced by the bench scripts: a docker-registry on loopback, its data under $W/reg.
# start_registry: a fresh, empty registry on $ADDR (stopping the one before); stop_registry
# stops it (the caller traps it on EXIT).
REG_PID=
start_registry() {
  stop_registry
  rm -rf "$W/reg" && mkdir -p "$W/reg"
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  ADDR=127.0.0.1:$port
  printf 'version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: %s\n' \
    "$W/reg/data" "$ADDR" > "$W/reg/config.yml"
  docker-registry serve "$W/reg/config.yml" > "$W/reg/log" 2>&1 &
  REG_PID=$!
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
}
stop_registry() { if [ -n "$REG_PID" ]; then kill "$REG_PID" 2>/dev/null || true; wait "$REG_PID" 2>/dev/null || true; REG_PID=; fi; }
