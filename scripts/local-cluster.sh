#!/usr/bin/env bash
# A three-node cluster of real processes on loopback.
#   up | down | status | leader | kill N | stop N | cont N | start N | wipe N
#   token --tenant T --scope "S" [--ttl 1h]
# API on 127.0.0.1:8081-8083 (API_BASE_PORT), peers on 9081-9083 (PEER_BASE_PORT);
# data, logs and pids under .local-cluster/ (LOCAL_CLUSTER_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh

DIR="${LOCAL_CLUSTER_DIR:-$PWD/.local-cluster}"
API_BASE_PORT="${API_BASE_PORT:-8080}"
PEER_BASE_PORT="${PEER_BASE_PORT:-9080}"
NODES=(1 2 3)

# DISTINCT_IPS=1 puts node N on 127.0.0.N (peer traffic leaves from it too), so that
# iptables can cut the link between two nodes (the chaos suite's partitions).
host_of() { if [ -n "${DISTINCT_IPS:-}" ]; then echo "127.0.0.$1"; else echo 127.0.0.1; fi; }
api_addr() { echo "$(host_of "$1"):$((API_BASE_PORT + $1))"; }
peer_addr() { echo "$(host_of "$1"):$((PEER_BASE_PORT + $1))"; }
pid_of() { cat "$DIR/node$1.pid" 2>/dev/null || true; }
alive() { local p; p=$(pid_of "$1"); [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }

# Secrets live in files only this user can read; nodes get the files' paths, never the
# secrets themselves on their command line (argv is readable by every local user).
ensure_secrets() {
  mkdir -p "$DIR"
  chmod 700 "$DIR"
  ( umask 077
    [ -s "$DIR/cluster.secret" ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$DIR/cluster.secret"
    [ -s "$DIR/jwt.secret" ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$DIR/jwt.secret" )
  chmod 600 "$DIR/cluster.secret" "$DIR/jwt.secret"
}

# The binary to run. `up` builds this checkout's (cargo rebuilds what changed: the target
# dir is shared between clones, so a binary that merely exists may be another
# checkout's); `start` and `token` use it as `up` left it, building only if it is
# missing. ORCH_BIN names a binary to run as it is.
ensure_binary() {
  if [ -n "${ORCH_BIN:-}" ]; then
    [ -x "$ORCHESTRATOR_BIN" ] || { echo "ORCH_BIN=$ORCH_BIN is not an executable" >&2; exit 1; }
    return
  fi
  if [ "${1:-}" = fresh ] || [ ! -x "$ORCHESTRATOR_BIN" ]; then
    scripts/prereqs.sh --build
    cargo build --bin orchestrator >&2
  fi
}

peers_of() {
  local me=$1 out="" n
  for n in "${NODES[@]}"; do
    [ "$n" = "$me" ] && continue
    out="${out:+$out,}$n=$(api_addr "$n")/$(peer_addr "$n")"
  done
  echo "$out"
}

# Shell tasks are gated behind executor.shell_enabled: enable them on the local cluster
# (unless the caller chose). A binary from before the gate rejects the unknown key, so
# ask the binary first. Then pick who runs them (scripts/shell-user.sh).
enable_shell() {
  if [ -z "${ORCHESTRATOR_EXECUTOR__SHELL_ENABLED:-}" ]; then
    ORCHESTRATOR_EXECUTOR__SHELL_ENABLED=true "$ORCHESTRATOR_BIN" config print >/dev/null 2>&1 || return 0
    export ORCHESTRATOR_EXECUTOR__SHELL_ENABLED=true
  fi
  . scripts/shell-user.sh
}

start_node() {
  local n=$1
  if alive "$n"; then echo "node $n already running (pid $(pid_of "$n"))"; return; fi
  ensure_secrets
  enable_shell
  local boot=()
  [ "$n" = 1 ] && boot=(--bootstrap)
  rm -f "$DIR/node$n.pid"
  # A node exits with 70 when Raft stops on a fatal error: restart it from its disk,
  # as a service manager would. Any other exit (a signal, a clean stop) ends the loop.
  (
    while :; do
      ORCHESTRATOR_AUTH__HS256_SECRET_FILE="$DIR/jwt.secret" \
      ORCHESTRATOR_EXECUTOR__SHELL_ENABLED="${ORCHESTRATOR_EXECUTOR__SHELL_ENABLED:-true}" \
        "$ORCHESTRATOR_BIN" server \
        --node-id "$n" --api-addr "$(api_addr "$n")" --peer-addr "$(peer_addr "$n")" \
        --data-dir "$DIR/node$n" --peers "$(peers_of "$n")" \
        --cluster-secret-file "$DIR/cluster.secret" "${boot[@]}" \
        >>"$DIR/node$n.log" 2>&1 </dev/null &
      echo $! > "$DIR/node$n.pid"
      rc=0
      wait $! || rc=$?
      [ "$rc" = 70 ] || exit 0
      echo "node $n exited after a fatal raft error; restarting" >>"$DIR/node$n.log"
    done
  ) >/dev/null 2>&1 &
  for _ in $(seq 50); do [ -s "$DIR/node$n.pid" ] && break; sleep 0.02; done
  echo "node $n started (pid $(pid_of "$n"), api $(api_addr "$n"))"
}

readyz() { curl -s -m 1 "http://$(api_addr "$1")/readyz" 2>/dev/null || true; }

leader() {
  local n body l
  for n in "${NODES[@]}"; do
    alive "$n" || continue
    body=$(readyz "$n")
    l=$(printf '%s' "$body" | sed -n 's/.*"leader":\([0-9][0-9]*\).*/\1/p')
    if [ -n "$l" ] && alive "$l"; then
      # Trust it only if the named leader says so itself.
      if readyz "$l" | grep -q '"state":"leader"'; then echo "$l"; return 0; fi
    fi
  done
  return 1
}

wait_leader() {
  local deadline=$((SECONDS + ${1:-60}))
  while [ $SECONDS -lt $deadline ]; do
    if l=$(leader); then echo "$l"; return 0; fi
    sleep 0.2
  done
  echo "no leader within ${1:-60}s; see $DIR/node*.log" >&2
  return 1
}

signal_node() {
  local sig=$1 n=$2
  alive "$n" || { echo "node $n is not running" >&2; return 1; }
  kill "-$sig" "$(pid_of "$n")"
  if [ "$sig" = KILL ]; then rm -f "$DIR/node$n.pid"; fi
  echo "sent SIG$sig to node $n"
}

cmd=${1:-}
shift || true
case "$cmd" in
  up)
    ensure_binary fresh
    for n in "${NODES[@]}"; do start_node "$n"; done
    l=$(wait_leader 90)
    echo "leader: node $l"
    ;;
  down)
    for n in "${NODES[@]}"; do
      if alive "$n"; then kill -CONT "$(pid_of "$n")" 2>/dev/null || true; kill -TERM "$(pid_of "$n")"; fi
    done
    for n in "${NODES[@]}"; do
      for _ in $(seq 100); do alive "$n" || break; sleep 0.1; done
      alive "$n" && kill -KILL "$(pid_of "$n")"
      rm -f "$DIR/node$n.pid"
    done
    echo "cluster stopped (data kept in $DIR; rm -rf it to start afresh)"
    ;;
  status)
    for n in "${NODES[@]}"; do
      if alive "$n"; then echo "node $n: pid $(pid_of "$n") $(readyz "$n")"; else echo "node $n: down"; fi
    done
    ;;
  leader) wait_leader "${1:-30}" ;;
  kill) signal_node KILL "$1" ;;
  stop) signal_node STOP "$1" ;;
  cont) signal_node CONT "$1" ;;
  start) ensure_binary; start_node "$1" ;;
  wipe)
    alive "$1" && { echo "stop node $1 first" >&2; exit 1; }
    rm -rf "$DIR/node$1"; echo "node $1 data wiped"
    ;;
  token)
    ensure_binary; ensure_secrets
    ORCHESTRATOR_AUTH__HS256_SECRET_FILE="$DIR/jwt.secret" \
      "$ORCHESTRATOR_BIN" token --data-dir "$DIR/token" "$@"
    ;;
  *)
    sed -n '2,6p' "$0" >&2
    exit 2
    ;;
esac
