#!/usr/bin/env bash
# Command 2 of the README, and what .ci/run calls: install prerequisites, then run the
# whole suite — formatting, lints, unit and property tests, the integration tests that
# start real three-node clusters as processes, and the chaos smoke profile — in one
# (dev) build profile.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
scripts/prereqs.sh
rustup component list --installed 2>/dev/null | grep -q rustfmt && cargo fmt --all -- --check
rustup component list --installed 2>/dev/null | grep -q clippy && cargo clippy --all-targets -- -D warnings
cargo test --all-targets --no-fail-fast -- --test-threads=2
# The chaos smoke profile: real processes, kills, pauses and partitions (about 1-2 min).
scripts/chaos/run.sh --profile smoke
# The benchmark suite's smoke: every workload once, briefly, on the dev build (about 1 min;
# it fails on an error or a non-2xx answer, never on a figure).
scripts/bench.sh --quick
