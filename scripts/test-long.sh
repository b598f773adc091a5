#!/usr/bin/env bash
# The long tests CI leaves out (scripts/test.sh runs their short versions): the whole tensor-
# parallel matrix (every golden case alone at every TP size), the long fuzz runs, the Debian
# root replay of the image's runtime install, and a 10-minute soak. About an hour on 2 cores.
# Run it by hand, or nightly, after scripts/test.sh has passed.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/env.sh
. scripts/env.sh
test_env

./scripts/setup.sh --test
cargo build --release --all-targets
export TPUSERVE_BIN="$CARGO_TARGET_DIR/release/tpuserve"

echo "== Rust tests marked long (#[ignore = \"long ...\"])" >&2
cargo nextest run --release --profile ci --run-ignored only --no-tests fail
echo "== fuzz targets, 10 minutes each" >&2
BOLERO_RANDOM_TEST_TIME_MS=600000 cargo nextest run --release --profile ci --test fuzz
echo "== Python tests marked long" >&2
"$VENV_PY" -m pytest -q -p no:cacheprovider -m long tests/python
echo "== soak, 10 minutes" >&2
"$VENV_PY" benches/soak.py --minutes 10
