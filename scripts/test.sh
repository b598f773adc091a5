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
./scripts/deny.sh
# The HTTP tests (tests/server_*.rs, tests/python) run the real `tpuserve` binary. Building
# every target first produces it with the same dependency features as the test build, so
# nothing is compiled twice; TPUSERVE_BIN tells the tests to use it as is.
cargo build --release --all-targets
export TPUSERVE_BIN="$CARGO_TARGET_DIR/release/tpuserve"
cargo test --release --all-targets 2>&1 | tee "${TMPDIR:-/tmp}/tpuserve-test.log"

# The official `openai` Python client against the same binary.
set +e
${PYTHON:-python3} -m pytest -q -p no:cacheprovider tests/python
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests in tests/python" >&2
  exit 1
fi
exit "$rc"
