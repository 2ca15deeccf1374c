#!/usr/bin/env bash
# Install what building and the test suite need on a bare Debian machine: libclang
# (bindgen for RocksDB's bindings), a C++ compiler, curl, python3 (chaos suite), iptables
# (partitions), libfaketime (clock-skew tests), Chromium with its WebDriver (the web UI
# test, tests/ui.rs) and wrk (the benchmark suite's load generator, scripts/bench.sh).
# Idempotent and quiet when everything is there.
# `--build`: only what building and running a server need (libclang, a C++ compiler,
# curl), for the dev server and the local cluster.
set -euo pipefail
build_only=false
[ "${1:-}" = "--build" ] && build_only=true

# What clang-sys (bindgen's loader) really opens: `libclang.so`, `libclang-N.so`,
# `libclang.so.N` or `libclang-N.so.N`, in LIBCLANG_PATH, the llvm dirs or the linker's
# paths. `libclang-cpp.so.N` (the C++ API library, a different package) is not it.
is_libclang() {
  local base
  base=$(basename "$1")
  [[ $base =~ ^libclang(-[0-9.]+)?\.so(\.[0-9.]+)?$ ]]
}
have_libclang() {
  local f
  for f in ${LIBCLANG_PATH:+"$LIBCLANG_PATH"/libclang*.so*} /usr/lib/llvm-*/lib/libclang*.so* \
    /usr/lib/*/libclang*.so* /usr/lib/libclang*.so* /usr/local/lib/libclang*.so*; do
    [ -e "$f" ] && is_libclang "$f" && return 0
  done
  while read -r f; do
    is_libclang "$f" && return 0
  done < <(ldconfig -p 2>/dev/null | awk '/libclang/ {print $NF}')
  return 1
}

missing=()
have_libclang || missing+=(libclang-dev)
command -v c++ >/dev/null 2>&1 || missing+=(g++)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if ! $build_only; then
command -v python3 >/dev/null 2>&1 || missing+=(python3)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
# The clock-skew tests preload libfaketime into a node (the library, not the wrapper).
compgen -G '/usr/lib/*/faketime/libfaketime.so.1' >/dev/null || missing+=(faketime)
# The UI test starts `chromedriver`, which starts `chromium` (Debian's launcher script,
# which execs /usr/lib/chromium/chromium): check that both really run, not just exist.
chromedriver --version >/dev/null 2>&1 || missing+=(chromium-driver)
chromium --headless=new --no-sandbox --version >/dev/null 2>&1 || missing+=(chromium)
# (`wrk -v` prints its version and exits 1.)
{ wrk -v 2>&1 || true; } | grep -q '^wrk ' || missing+=(wrk)
fi

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing system packages: ${missing[*]} (run as root or: sudo apt-get install -y ${missing[*]})" >&2
    exit 1
  fi
  echo "installing system packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is not installed: install the Rust toolchain (https://rustup.rs) first" >&2
  exit 1
fi
