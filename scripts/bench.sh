#!/usr/bin/env bash
# The gateway benchmark: wrk straight to `tollgate simulate` vs. through the
# gateway, side by side in one run, plus fixed-rate latency, time to first
# token, CPU per request and memory. Prints a table and writes BENCHMARKS.md.
#   scripts/bench.sh            (BENCH_SECONDS=10 per run by default)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tollgate/target}"

if ! command -v wrk >/dev/null; then
  echo "==> installing wrk"
  apt-get update -qq && apt-get install -y -qq wrk
fi
echo "==> building release"
cargo build --release --bin tollgate
ulimit -n 65536 2>/dev/null || true
exec python3 scripts/bench.py "$CARGO_TARGET_DIR/release/tollgate"
