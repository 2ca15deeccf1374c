# Sourced by the scripts: where builds go and where the binary is.
# The target dir lives outside the clone so fresh clones reuse the compiled RocksDB.
: "${CARGO_TARGET_DIR:=/var/tmp/orchestrator-target}"
export CARGO_TARGET_DIR
ORCHESTRATOR_BIN="$CARGO_TARGET_DIR/debug/orchestrator"
