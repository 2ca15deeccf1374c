# Sourced by the scripts: where builds go and where the binary is.
# The target dir lives outside the clone so fresh clones reuse the compiled RocksDB.
: "${CARGO_TARGET_DIR:=/var/tmp/orchestrator-target}"
export CARGO_TARGET_DIR
# ORCH_BIN picks another binary (the bench runs the release build); not ORCHESTRATOR_*:
# the server reads every ORCHESTRATOR_* variable as configuration.
ORCHESTRATOR_BIN="${ORCH_BIN:-$CARGO_TARGET_DIR/debug/orchestrator}"

# Cargo keys our own crates' fingerprints by package, not by checkout path, and their
# dep-info names the source files of the checkout that built them: a second clone sharing
# this target dir would be told "Fresh" and run the first clone's code. So when the
# checkout building here changes, forget the fingerprints of the crates that live in the
# checkout (ours and the vendored openraft); dependencies from crates.io stay built.
_checkout="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
if [ "$(cat "$CARGO_TARGET_DIR/.checkout" 2>/dev/null)" != "$_checkout" ]; then
  rm -rf "$CARGO_TARGET_DIR"/*/.fingerprint/orchestrator-* "$CARGO_TARGET_DIR"/*/.fingerprint/openraft-*
  mkdir -p "$CARGO_TARGET_DIR"
  echo "$_checkout" >"$CARGO_TARGET_DIR/.checkout"
fi
unset _checkout
