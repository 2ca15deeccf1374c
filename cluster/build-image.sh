#!/usr/bin/env bash
# Build the `orchestrator:local` image without any registry: the binary built on this
# host, the shared libraries it links, and a static busybox (so `shell` tasks and the
# health check have /bin/sh and wget), on `FROM scratch`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
scripts/prereqs.sh
command -v busybox >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null; }
cargo build --bin orchestrator
# The compose cluster's secrets: random, private, generated once (never a placeholder).
( umask 077; mkdir -p cluster/secrets
  for s in cluster jwt; do
    [ -s "cluster/secrets/$s.secret" ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "cluster/secrets/$s.secret"
  done )
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
root="$ctx/rootfs"
mkdir -p "$root/bin" "$root/data" "$root/tmp" "$root/etc"
cp "$ORCHESTRATOR_BIN" "$root/orchestrator"
# Every shared library the binary needs, at the same path as on the host.
for lib in $(ldd "$ORCHESTRATOR_BIN" | awk '/=>/ {print $3} /^[ \t]*\/lib/ {print $1}'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
cp "$(command -v busybox)" "$root/bin/busybox"
for applet in sh ash echo cat ls sleep wget env date mkdir rm true false test grep; do
  ln -s busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/:/bin/sh\n' > "$root/etc/passwd"
chmod 1777 "$root/tmp"
cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
ENV PATH=/bin RUST_LOG=info,openraft=warn
VOLUME /data
ENTRYPOINT ["/orchestrator"]
CMD ["server", "--config", "/etc/orchestrator.toml"]
DOCKERFILE
docker build -q -t orchestrator:local "$ctx"
echo "built orchestrator:local ($(docker image inspect orchestrator:local --format '{{.Size}}') bytes)"
