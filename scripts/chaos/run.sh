#!/usr/bin/env bash
# Chaos suite: workload + nemeses + history + checker against a three-node cluster.
#   scripts/chaos/run.sh --profile smoke|full [--workload normal|heavy] [--backend local|docker] [--seed N] [--trials N]
#                        [--scenarios a,b] [--fault-scope process|node] [--out DIR] [--max-minutes M]
#   scripts/chaos/run.sh --witness-selftest   (the attempt witness against known processes, no cluster)
# Exits non-zero on any violation and prints the seed to replay it.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/env.sh
if [ ! -x "$ORCHESTRATOR_BIN" ]; then scripts/prereqs.sh; cargo build --bin orchestrator; fi
# The clusters run this binary as it is (in the suite: the one `cargo test` built).
export ORCH_BIN="$ORCHESTRATOR_BIN"
exec python3 scripts/chaos/chaos.py "$@"
