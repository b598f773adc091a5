#!/usr/bin/env bash
# `cargo deny check` against deny.toml: licences, bans and sources always (they need nothing
# but the lock file); advisories when the RustSec database can be had. That database is a git
# repository outside the package registries: a machine that cannot reach it (this project's
# sandboxed CI) and has no copy from an earlier fetch cannot check advisories, and this script
# says so loudly instead of passing silently. TPUSERVE_REQUIRE_ADVISORIES=1 makes that an error.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo deny --version >/dev/null
cargo deny --log-level error check bans licenses sources
echo "deny: bans, licenses, sources ok" >&2

db_dir=${CARGO_HOME:-$HOME/.cargo}/advisory-dbs
# One short try at updating the database: a machine without the network fails at once or hangs
# until the timeout, and the rest of the suite should not wait longer than that for it.
probe_s=${TPUSERVE_DENY_FETCH_TIMEOUT:-10}
if timeout "$probe_s" cargo deny --log-level error fetch db >/dev/null 2>&1; then
  cargo deny --log-level error --offline check advisories
  echo "deny: advisories ok (database updated)" >&2
elif compgen -G "$db_dir/*/crates" >/dev/null; then
  cargo deny --log-level error --offline check advisories
  echo "deny: advisories ok against the copy in $db_dir (could not update it within ${probe_s} s)" >&2
elif [ "${TPUSERVE_REQUIRE_ADVISORIES:-0}" = 1 ]; then
  echo "deny: the RustSec advisory database cannot be fetched from this machine" >&2
  exit 1
else
  echo "deny: WARNING: advisories NOT checked: the RustSec advisory database could not be" \
    "fetched within ${probe_s} s and there is no earlier copy (run scripts/deny.sh where it can)" >&2
fi
