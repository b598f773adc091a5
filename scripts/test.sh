#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run): set-up, format and lint checks, then every
# test — Rust under cargo-nextest, then the Python HTTP tests under pytest-xdist. Each stage's
# time is printed at the end (also when a stage fails). The long versions (soak, long fuzz
# runs, the whole TP matrix, the Debian-root replay) are in scripts/test-long.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/env.sh
. scripts/env.sh

test_env

STAGES=()
T_ALL=$SECONDS
report() {
  local rc=$?
  echo "== stage times (s)" >&2
  for s in "${STAGES[@]}"; do echo "   $s" >&2; done
  echo "   total: $((SECONDS - T_ALL))" >&2
  return $rc
}
trap report EXIT
# stage NAME COMMAND...: runs COMMAND and records how long it took.
stage() {
  local name=$1 t0=$SECONDS rc=0
  shift
  echo "== $name" >&2
  "$@" || rc=$?
  STAGES+=("$(printf '%-8s %5d' "$name" $((SECONDS - t0)))$([ "$rc" = 0 ] || echo " (failed, exit $rc)")")
  return $rc
}

stage setup ./scripts/setup.sh --test
stage fmt cargo fmt --all -- --check
stage clippy cargo clippy --release --all-targets -- -D warnings
stage deny ./scripts/deny.sh
# The HTTP tests (tests/server_*.rs, tests/python) run the real `tpuserve` binary. Building
# every target first produces it with the same dependency features as the test build, so
# nothing is compiled twice; TPUSERVE_BIN tells the tests to use it as is.
stage build cargo build --release --all-targets
export TPUSERVE_BIN="$CARGO_TARGET_DIR/release/tpuserve"
# nextest: one process per test, XLA tests one at a time beside the rest
# (.config/nextest.toml); JUnit report in $CARGO_TARGET_DIR/nextest/ci/junit.xml.
stage rust cargo nextest run --release --profile ci --no-tests fail

# The official `openai` Python client (and the other HTTP-level tests) against the same
# binary, in the project venv, two workers.
pytest_rc=0
stage python "$VENV_PY" -m pytest -q -p no:cacheprovider -m "not long" -n 2 --dist loadfile \
  --durations 15 tests/python \
  || pytest_rc=$?
if [ "$pytest_rc" -eq 5 ]; then
  echo "pytest collected no tests in tests/python" >&2
  exit 1
fi

# kernels/: the Pallas kernels in Pallas' TPU interpreter on the CPU, their lowering for v6e,
# and libtpu compiling it (target/…/examples/compile_tpu, inside `unshare -n`).
kernels_tests() {
  (cd kernels && PYTHONDONTWRITEBYTECODE=1 "$KERNELS_PY" -m pytest -q -p no:cacheprovider tests)
}
kernels_rc=0
stage kernels kernels_tests || kernels_rc=$?
[ "$pytest_rc" -ne 0 ] && exit "$pytest_rc"
exit "$kernels_rc"
