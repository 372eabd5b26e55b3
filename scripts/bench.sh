#!/usr/bin/env bash
# Benchmarks, each writing its own section of BENCHMARKS.md:
#   scripts/bench.sh gateway    wrk straight to `tollgate simulate` vs. through
#                               the gateway, side by side in one run, plus
#                               fixed-rate latency, time to first token, CPU per
#                               request and memory (BENCH_SECONDS=10 per run)
#   scripts/bench.sh pipeline   the usage pipeline: ingest ceiling, Kafka ingest
#                               vs. raw consume on one broker, bytes per event,
#                               tap CPU per event, freshness (BENCH_EVENTS)
#   scripts/bench.sh query      the query service vs DuckDB on the same
#                               generated lake (BENCH_EVENTS=10000000)
#   scripts/bench.sh telemetry  the gateway with request metrics off, on, and
#                               on with OpenTelemetry export, side by side
#   scripts/bench.sh limits     the gateway with no rules, five rules in
#                               process and five rules shared through Redis
#   scripts/bench.sh dashboard  the built-in dashboard's first render in headless
#                               Chromium and the alerts' evaluation cost, over
#                               the query benchmark's lake
#   scripts/bench.sh cache      the response cache (hit and miss paths) and the
#                               content guard (4 KB prompt, 1,000-token stream),
#                               each against off, and the semantic lookup at
#                               100,000 entries
#   scripts/bench.sh            all seven
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tollgate/target}"
export PATH="$HOME/.cargo/bin:$PATH"
what="${1:-all}"

if ! command -v wrk >/dev/null; then
  echo "==> installing wrk"
  apt-get update -qq && apt-get install -y -qq wrk
fi
VENV="${TOLLGATE_VENV:-$HOME/.cache/tollgate/venv}"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import duckdb, playwright" 2>/dev/null; then
  python3 -m venv "$VENV" && "$VENV/bin/pip" install --quiet -r tests/python/requirements.txt
fi
if { [ "$what" = limits ] || [ "$what" = all ]; } && ! command -v redis-server >/dev/null; then
  echo "==> installing redis-server"
  apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server
fi
if { [ "$what" = dashboard ] || [ "$what" = all ]; } && ! command -v chromium >/dev/null; then
  echo "==> installing chromium"
  apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium
fi
if [ "$what" != gateway ] && [ "$what" != query ] && [ "$what" != telemetry ] && [ "$what" != limits ] && [ "$what" != dashboard ] && [ "$what" != cache ] && ! command -v tansu >/dev/null; then
  echo "==> installing the tansu broker"
  env -u CARGO_TARGET_DIR cargo install tansu --locked --features dynostore,libsql
fi
# BENCH_PROFILE=profiling: release code generation without LTO, which
# relinks in minutes on 2 cores where LTO takes half an hour.
PROFILE="${BENCH_PROFILE:-release}"
export BENCH_PROFILE="$PROFILE"
echo "==> building $PROFILE"
cargo build --profile "$PROFILE" --bin tollgate
ulimit -n 65536 2>/dev/null || true
BIN="$CARGO_TARGET_DIR/$PROFILE/tollgate"
case "$what" in
  gateway) python3 scripts/bench.py "$BIN" ;;
  pipeline) python3 scripts/bench_pipeline.py "$BIN" ;;
  query) "$VENV/bin/python" scripts/bench_query.py "$BIN" ;;
  telemetry) python3 scripts/bench_telemetry.py "$BIN" ;;
  limits) python3 scripts/bench_limits.py "$BIN" ;;
  dashboard) "$VENV/bin/python" scripts/bench_dashboard.py "$BIN" ;;
  cache) python3 scripts/bench_cache.py "$BIN" ;;
  all) python3 scripts/bench.py "$BIN" && python3 scripts/bench_pipeline.py "$BIN" \
    && "$VENV/bin/python" scripts/bench_query.py "$BIN" && python3 scripts/bench_telemetry.py "$BIN" \
    && python3 scripts/bench_limits.py "$BIN" && "$VENV/bin/python" scripts/bench_dashboard.py "$BIN" \
    && python3 scripts/bench_cache.py "$BIN" ;;
  *) echo "usage: scripts/bench.sh [gateway|pipeline|query|telemetry|limits|dashboard|cache|all]" >&2; exit 2 ;;
esac
