#!/usr/bin/env bash
# Build the `orchestrator:local` image without any registry: the binary built on this
# host, the shared libraries it links, and a static busybox (so `shell` tasks and the
# health check have /bin/sh and wget), on `FROM scratch`. The node runs as the
# unprivileged user `orchestrator` (uid/gid 65532), which owns /data and /data-work
# (attempts' working dirs) and nothing else.
#   cluster/build-image.sh            # the debug build (the one the tests build: quick
#                                     # after ./scripts/test.sh); for trying it out
#   cluster/build-image.sh --release  # the optimised build, for anything beyond that
#                                     # (the first one compiles RocksDB again, ~15-30 min)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
case "${1:-}" in
  "") profile=(); ORCHESTRATOR_BIN="$CARGO_TARGET_DIR/debug/orchestrator" ;;
  --release) profile=(--release); ORCHESTRATOR_BIN="$CARGO_TARGET_DIR/release/orchestrator" ;;
  *) echo "usage: $0 [--release]" >&2; exit 2 ;;
esac
scripts/prereqs.sh --build
command -v busybox >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null; }
cargo build "${profile[@]}" --bin orchestrator
# The compose cluster's secrets: random, private, generated once (never a placeholder),
# readable by the image's user only (they are mounted read-only at /run/secrets).
NODE_UID=65532
( umask 077; mkdir -p cluster/secrets
  for s in cluster jwt; do
    [ -s "cluster/secrets/$s.secret" ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "cluster/secrets/$s.secret"
  done )
if [ "$(stat -c %u cluster/secrets/cluster.secret)" != "$NODE_UID" ]; then
  chown "$NODE_UID:$NODE_UID" cluster/secrets cluster/secrets/*.secret 2>/dev/null || {
    echo "cluster/secrets must be owned by uid $NODE_UID (the image's user), which only root can do:" >&2
    echo "  sudo chown -R $NODE_UID:$NODE_UID cluster/secrets" >&2
    exit 1
  }
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
root="$ctx/rootfs"
mkdir -p "$root/bin" "$root/data" "$root/tmp" "$root/etc"
cp "$ORCHESTRATOR_BIN" "$root/orchestrator"
# On the PATH too: the commands a node prints (`orchestrator token …`) work as printed in
# `docker exec`.
ln -s /orchestrator "$root/bin/orchestrator"
# Every shared library the binary needs, at the same path as on the host.
for lib in $(ldd "$ORCHESTRATOR_BIN" | awk '/=>/ {print $3} /^[ \t]*\/lib/ {print $1}'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
cp "$(command -v busybox)" "$root/bin/busybox"
for applet in sh ash echo cat ls sleep wget env date mkdir rm true false test grep; do
  ln -s busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/:/bin/sh\norchestrator:x:%s:%s:orchestrator:/data:/bin/sh\n' "$NODE_UID" "$NODE_UID" > "$root/etc/passwd"
printf 'root:x:0:\norchestrator:x:%s:\n' "$NODE_UID" > "$root/etc/group"
chmod 1777 "$root/tmp"
# /data comes from its own COPY, owned by the node's user (a new volume starts as a copy).
rmdir "$root/data"
mkdir -m 0700 "$ctx/data"
cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
COPY --chown=65532:65532 data/ /data/
# Shell attempts' working dirs (executor.shell_work_dir defaults to <data_dir>-work).
COPY --chown=65532:65532 data/ /data-work/
ENV PATH=/bin RUST_LOG=info,openraft=warn
USER 65532:65532
VOLUME /data
ENTRYPOINT ["/orchestrator"]
CMD ["server", "--config", "/etc/orchestrator.toml"]
DOCKERFILE
docker build -q -t orchestrator:local "$ctx"
echo "built orchestrator:local ($(docker image inspect orchestrator:local --format '{{.Size}}') bytes, runs as $(docker image inspect orchestrator:local --format '{{.Config.User}}'))"
