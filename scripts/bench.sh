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
if [[ " $* " == *" --quick "* ]]; then
  # The binary the integration tests build (same features as `cargo test`): after the
  # suite this compiles nothing, where `cargo build` would rebuild every dependency
  # without the dev-dependencies' features.
  cargo test --no-run --test cli
  bin="$CARGO_TARGET_DIR/debug/orchestrator"
else
  cargo build --release --bin orchestrator
  bin="$CARGO_TARGET_DIR/release/orchestrator"
fi
exec python3 scripts/bench/bench.py --bin "$bin" "$@"
