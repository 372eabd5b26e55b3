#!/usr/bin/env bash
# Runs every test: Rust unit and end-to-end tests (real processes on
# 127.0.0.1, a real Kafka-protocol broker), then the Python clients (the
# official openai SDK against the gateway; a real Prometheus and an OTLP
# receiver against its telemetry; two gateways sharing a real Redis; psql, psycopg, asyncpg, SQLAlchemy,
# pandas and Grafana's queries and dashboard against the ledger; alerts to a
# webhook receiver; the built-in dashboard in headless Chromium; Spark on
# the lake), then a
# sweep of every log, event and response body the tests kept for the canary
# secrets they used. Installs what it needs first; quick when already there.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tollgate/target}"
VENV="${TOLLGATE_VENV:-$HOME/.cache/tollgate/venv}"
ARTIFACTS="$CARGO_TARGET_DIR/tmp/e2e"

# Python clients (openai SDK, DuckDB, psycopg) and moto's S3-compatible server for
# the object-store lake test, in a venv outside the clone;
# reinstalled only when requirements.txt changes.
REQS_STAMP="$VENV/.requirements.sha256"
REQS_SUM="$(sha256sum tests/python/requirements.txt | cut -d' ' -f1)"
if [ "$(cat "$REQS_STAMP" 2>/dev/null)" != "$REQS_SUM" ]; then
  echo "==> installing Python test clients into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/python/requirements.txt
  echo "$REQS_SUM" > "$REQS_STAMP"
fi

# The Kafka-protocol broker the pipeline tests start (one per test, on its
# own port): tansu, from crates.io. About 15 minutes to build the first time.
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v tansu >/dev/null 2>&1; then
  echo "==> installing the tansu broker (first run only)"
  env -u CARGO_TARGET_DIR cargo install tansu --locked --features dynostore,libsql
fi

# psql, for the PostgreSQL wire tests: Debian's postgresql-client.
if ! command -v psql >/dev/null 2>&1; then
  echo "==> installing postgresql-client (psql)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-client >/dev/null
fi

# Prometheus (scrapes the gateway in the observability test) and its promtool:
# Debian's prometheus package.
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  echo "==> installing prometheus"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

# Redis (shared limit counters across gateways; each test starts its own on a
# loopback port): Debian's redis-server, without its system service.
if ! command -v redis-server >/dev/null 2>&1; then
  echo "==> installing redis-server"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi

# The built-in dashboard's test drives a real browser: Debian's chromium
# (Playwright, from the venv, uses it as the system browser; it downloads
# no browser of its own).
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  echo "==> installing chromium"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

# PySpark 4 for the test that Spark reads the lake: Debian's Java runtime
# (Spark 4 needs 17 or 21) and pyspark in its own venv outside the clone; a
# 456 MB download the first time, about 0.1 s when already there.
PYSPARK_VERSION="4.3.0"
PYSPARK_VENV="${TOLLGATE_PYSPARK_VENV:-$HOME/.cache/tollgate/pyspark-venv}"
java_major="$( (java -XshowSettings:properties -version 2>&1 || true) | sed -n 's/^ *java\.specification\.version = //p')"
java_major="${java_major%%.*}"
if [ "${java_major:-0}" -lt 17 ]; then
  echo "==> installing a Java runtime (default-jre-headless) for PySpark"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless >/dev/null
fi
if [ "$(cat "$PYSPARK_VENV/.pyspark-version" 2>/dev/null)" != "$PYSPARK_VERSION" ]; then
  echo "==> installing pyspark $PYSPARK_VERSION into $PYSPARK_VENV (first run only)"
  rm -rf "$PYSPARK_VENV"
  python3 -m venv "$PYSPARK_VENV"
  # --no-cache-dir: pip would otherwise keep the sdist and the built wheel (~0.9 GB).
  "$PYSPARK_VENV/bin/pip" install --quiet --no-cache-dir --disable-pip-version-check \
    "pyspark==$PYSPARK_VERSION" pytest==9.2.0
  echo "$PYSPARK_VERSION" > "$PYSPARK_VENV/.pyspark-version"
fi

export TOLLGATE_MOTO="$VENV/bin/moto_server"

rm -rf "$ARTIFACTS"
mkdir -p "$ARTIFACTS"

echo "==> layout (file sizes, import circles)"
python3 scripts/check_layout.py

echo "==> cargo test (workspace)"
cargo test --workspace --all-targets

echo "==> openai SDK tests"
TOLLGATE_BIN="$CARGO_TARGET_DIR/debug/tollgate" TOLLGATE_ARTIFACTS="$ARTIFACTS/python" \
  "$VENV/bin/python" -m pytest tests/python -q -p no:cacheprovider

echo "==> Spark reads the lake"
TOLLGATE_BIN="$CARGO_TARGET_DIR/debug/tollgate" \
  "$PYSPARK_VENV/bin/python" -m pytest tests/spark -q -p no:cacheprovider

# Lakes are compressed Parquet: dump them to CSV so the sweep sees every value.
"$VENV/bin/python" - "$ARTIFACTS" <<'PY'
import pathlib, sys, duckdb
for usage in pathlib.Path(sys.argv[1]).rglob("usage"):
    if usage.is_dir() and any(usage.rglob("*.parquet")):
        out = usage.parent / "lake-dump.csv"
        # A file list, not a glob: directory names may hold glob characters.
        files = sorted(str(f) for f in usage.rglob("*.parquet"))
        duckdb.execute(f"COPY (SELECT * FROM read_parquet({files!r}, hive_partitioning = true)) TO '{out}' (HEADER)")
PY

echo "==> canary secret sweep over $ARTIFACTS"
if grep -rIl -e "tg-canary-" -e "sk-canary-" "$ARTIFACTS"; then
  echo "FAIL: a canary secret appears in the files above (logs, events or bodies)" >&2
  exit 1
fi
echo "no secret found in $(find "$ARTIFACTS" -type f | wc -l) files"
