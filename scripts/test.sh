#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, format and lint checks, then every test.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

# Builds are shared across clones (CI starts from a fresh clone each time).
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/tpuserve/target}
export CARGO_TERM_COLOR=never

cargo fmt --all -- --check
cargo clippy --release --all-targets -- -D warnings
cargo test --release --all-targets 2>&1 | tee "${TMPDIR:-/tmp}/tpuserve-test.log"
