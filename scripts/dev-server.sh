#!/usr/bin/env bash
# Command 1 of the README: install prerequisites, build, and run a single-node server on
# the embedded default (API on 127.0.0.1:8080, data in ./orchestrator-data).
# Extra arguments go to `orchestrator server`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
scripts/prereqs.sh
cargo build --bin orchestrator
# A development node runs shell tasks (for tokens with the orchestrator:shell scope);
# production nodes leave executor.shell_enabled off unless they need it.
ORCHESTRATOR_EXECUTOR__SHELL_ENABLED="${ORCHESTRATOR_EXECUTOR__SHELL_ENABLED:-true}" \
  exec "$ORCHESTRATOR_BIN" server "$@"
