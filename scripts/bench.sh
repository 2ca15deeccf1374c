#!/usr/bin/env bash
# The benchmark suite (docs/performance.md): builds the release binary, starts its own
# three-node cluster on loopback (ports 8281-8283 / 9281-9283, data in .bench-cluster/),
# runs every workload and prints a table (and JSON with --json).
#   scripts/bench.sh [--json] [--workloads dags,get,...] [--repeats N] [--duration S]
#   scripts/bench.sh --quick     # seconds-long smoke on the dev build (CI runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
scripts/prereqs.sh
if ! command -v wrk >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then echo "the bench needs wrk (apt-get install -y wrk)" >&2; exit 1; fi
  echo "installing wrk (the load generator)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
fi
if [[ " $* " == *" --quick "* ]]; then
  cargo build --bin orchestrator
  bin="$CARGO_TARGET_DIR/debug/orchestrator"
else
  cargo build --release --bin orchestrator
  bin="$CARGO_TARGET_DIR/release/orchestrator"
fi
exec python3 scripts/bench/bench.py --bin "$bin" "$@"
