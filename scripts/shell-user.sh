# Sourced by dev-server.sh and local-cluster.sh once shell tasks are on: who runs them.
# A node refuses shell attempts that would run as root or as itself (they could read its
# data dir and secrets) unless it is in dev mode. Unless the caller chose
# (ORCHESTRATOR_EXECUTOR__SHELL_USER or ORCHESTRATOR_DEV_MODE):
# - as root, attempts run as `nobody`, which cannot read the nodes' data dirs;
# - otherwise the node cannot switch users, so it runs as a local trial (dev mode) and
#   attempts run as you.
if [ "${ORCHESTRATOR_EXECUTOR__SHELL_ENABLED:-false}" = true ] \
   && [ -z "${ORCHESTRATOR_EXECUTOR__SHELL_USER:-}${ORCHESTRATOR_DEV_MODE:-}" ]; then
  if [ "$(id -u)" = 0 ] && id nobody >/dev/null 2>&1; then
    export ORCHESTRATOR_EXECUTOR__SHELL_USER=nobody
  else
    export ORCHESTRATOR_DEV_MODE=true
  fi
fi
