#!/usr/bin/env bash
# Command 1 of the README: install prerequisites, build, put `orchestrator` on the PATH
# (a symlink in ~/.cargo/bin), and run a single-node server on the embedded default
# (API on 127.0.0.1:8080, data in ./orchestrator-data). Extra arguments go to
# `orchestrator server`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
scripts/prereqs.sh --build
cargo build --bin orchestrator
bin_dir="${CARGO_HOME:-$HOME/.cargo}/bin"
mkdir -p "$bin_dir"
ln -sf "$ORCHESTRATOR_BIN" "$bin_dir/orchestrator"
echo "linked $bin_dir/orchestrator -> $ORCHESTRATOR_BIN"
case ":$PATH:" in
  *":$bin_dir:"*) ;;
  *) echo "$bin_dir is not on your PATH; in the shell where you use the CLI, run: export PATH=\"$bin_dir:\$PATH\"" ;;
esac
# A development node runs shell tasks (for tokens with the orchestrator:shell scope);
# scripts/shell-user.sh picks who runs them. Production nodes leave
# executor.shell_enabled off, or run as root with a dedicated executor.shell_user
# (docs/security.md).
export ORCHESTRATOR_EXECUTOR__SHELL_ENABLED="${ORCHESTRATOR_EXECUTOR__SHELL_ENABLED:-true}"
. scripts/shell-user.sh
exec "$ORCHESTRATOR_BIN" server "$@"
