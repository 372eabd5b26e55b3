"""Query service benchmark: the cost and ROI reports and three ad-hoc SQL
queries over a generated lake, each timed against DuckDB on the same files in
the same run (hot: one warm-up, then the median of RUNS rounds in which the
two engines take turns). Writes the `query` section of BENCHMARKS.md.

    python3 scripts/bench_query.py <tollgate binary>   (BENCH_EVENTS, BENCH_DAYS, BENCH_RUNS)
"""

import datetime
import hashlib
import json
import os
import pathlib
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import duckdb

from benchmd import write_section
from bench import machine

BIN = sys.argv[1]
EVENTS = int(os.environ.get("BENCH_EVENTS", "10000000"))
DAYS = int(os.environ.get("BENCH_DAYS", "30"))
RUNS = int(os.environ.get("BENCH_RUNS", "7"))
BUILD = os.environ.get("BENCH_PROFILE", "release")
TOKEN = "bench-admin-token"
LAKE = pathlib.Path(os.environ.get("BENCH_LAKE", pathlib.Path.home() / ".cache/tollgate/bench-lake")) / f"{EVENTS}-{DAYS}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The files that decide what the generated lake holds: a change to any of
# them makes a cached lake stale.
LAKE_SOURCES = ["schemas/src/arrow.rs", "ingest/src/columns.rs", "ingest/src/lake.rs", "ingest/src/synth.rs", "lake/src/layout.rs"]


def lake_fingerprint():
    root = pathlib.Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for name in LAKE_SOURCES:
        h.update((root / name).read_bytes())
    return h.hexdigest()[:16]


def generate():
    stamp = LAKE / ".complete"
    fingerprint = lake_fingerprint()
    if stamp.exists():
        took, _, made_from = stamp.read_text().partition(" ")
        if made_from == fingerprint:
            return float(took)
    shutil.rmtree(LAKE, ignore_errors=True)
    t = time.time()
    subprocess.run([BIN, "gen-lake", "--lake", str(LAKE), "--events", str(EVENTS), "--days", str(DAYS)], check=True)
    took = time.time() - t
    stamp.write_text(f"{took} {fingerprint}")
    return took


def start_service():
    port = free_port()
    cfg = pathlib.Path(tempfile.mkdtemp()) / "query.toml"
    cfg.write_text(f"""
[pipeline]
lake = "{LAKE}"

[query]
listen = "127.0.0.1:{port}"
pg_listen = "off"
admin_token = "{TOKEN}"
threads = 2
memory_mb = 2048
timeout_ms = 600000
""")
    p = subprocess.Popen([BIN, "query", "--config", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in p.stdout:
        if line.startswith("query API on http://"):
            return p, line.strip().split("http://")[1]
    raise RuntimeError("the query service did not start")


def call(addr, method, path, body=None):
    req = urllib.request.Request(f"http://{addr}{path}", method=method, data=json.dumps(body).encode() if body else None)
    req.add_header("Authorization", f"Bearer {TOKEN}")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=900) as r:
        return json.loads(r.read())


def side_by_side(ours, theirs):
    """Medians of RUNS rounds that alternate the two (and which goes first),
    so a noisy neighbour slows both sides alike instead of one."""
    ours(), theirs()  # warm: footers and file listings cached by the OS and the engine
    samples = ([], [])
    for i in range(RUNS):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for side in order:
            t = time.perf_counter()
            (ours, theirs)[side]()
            samples[side].append(time.perf_counter() - t)
    return statistics.median(samples[0]), statistics.median(samples[1])


def main():
    gen_s = generate()
    files = list((LAKE / "usage").rglob("*.parquet"))
    size = sum(f.stat().st_size for f in files)
    # The latest whole day: the lake's last day ends when it was generated.
    days = sorted((p.name.split("=")[1], len(list(p.iterdir()))) for p in (LAKE / "usage").iterdir())
    last_day = max((d for d, hours in days if hours == 24), default=days[-1][0])
    week_from = (datetime.date.fromisoformat(days[-1][0]) - datetime.timedelta(days=6)).isoformat()
    proc, addr = start_service()
    con = duckdb.connect()
    con.execute("SET threads = 2")
    glob = str(LAKE / "usage" / "**" / "*.parquet")
    con.execute(f"CREATE VIEW usage AS SELECT * FROM read_parquet('{glob}', hive_partitioning = true)")
    frm, to = "2000-01-01", "2100-01-01"
    adhoc = [
        ("top 10 consumers by cost, last 7 days",
         f"SELECT consumer, sum(cost_usd) AS cost FROM usage WHERE date >= DATE '{week_from}' GROUP BY consumer ORDER BY cost DESC LIMIT 10"),
        ("p95 latency per model and hour, one day",
         f"SELECT coalesce(served_model, requested_model) AS model, hour, approx_percentile_cont(latency_ms, 0.95) AS p95 FROM usage WHERE date = DATE '{last_day}' GROUP BY 1, 2 ORDER BY 1, 2",
         f"SELECT coalesce(served_model, requested_model) AS model, hour, approx_quantile(latency_ms, 0.95) AS p95 FROM usage WHERE date = DATE '{last_day}' GROUP BY 1, 2 ORDER BY 1, 2"),
        ("fallback reasons and cache hit rate per team",
         "SELECT team, fallback_reason, count(*) AS n, avg(CASE WHEN cache = 'hit' THEN 1.0 ELSE 0.0 END) AS hit_rate FROM usage GROUP BY team, fallback_reason ORDER BY n DESC"),
    ]
    rows = []
    try:
        daily = lambda: call(addr, "GET", f"/v1/reports/cost?from={frm}&to={to}&group_by=consumer,model&granularity=day")
        daily_duck = lambda: con.execute(
            "SELECT date, consumer, coalesce(served_model, requested_model), count(*), sum(input_tokens),"
            " sum(cached_input_tokens), sum(output_tokens), sum(reasoning_tokens), sum(cost_usd), sum(cost_saved_usd) FROM usage GROUP BY ALL").fetchall()
        rows.append(("cost report: per consumer, model and day", *side_by_side(daily, daily_duck)))
        check = daily()
        duck_total = con.execute("SELECT sum(cost_usd), count(*) FROM usage").fetchone()
        assert str(duck_total[0]).rstrip("0").rstrip(".") == check["totals"]["cost_usd"].rstrip("0").rstrip("."), (duck_total, check["totals"])
        assert check["totals"]["requests"] == duck_total[1] == EVENTS
        roi = lambda: call(addr, "GET", f"/v1/reports/roi?from={frm}&to={to}&reprice=deepseek-r1:qwq-32b&gpu_hour_usd=2&tokens_per_s=1000")
        roi_duck = lambda: (
            con.execute("SELECT consumer, requested_model, coalesce(served_model, requested_model), date, count(*), sum(input_tokens),"
                        " sum(cached_input_tokens), sum(output_tokens), sum(reasoning_tokens), sum(cost_usd), sum(cost_saved_usd) FROM usage GROUP BY ALL").fetchall(),
            con.execute("SELECT consumer, requested_model, sum(CASE WHEN status >= 400 THEN 1 ELSE 0 END), sum(CASE WHEN fallback THEN 1 ELSE 0 END),"
                        " sum(CASE WHEN cache = 'hit' THEN 1 ELSE 0 END), approx_quantile(latency_ms, 0.5), approx_quantile(latency_ms, 0.95),"
                        " approx_quantile(ttft_ms, 0.5), approx_quantile(ttft_ms, 0.95),"
                        " sum(CASE WHEN status < 400 AND output_tokens > 0 THEN output_tokens ELSE 0 END),"
                        " sum(CASE WHEN status < 400 AND output_tokens > 0 THEN latency_ms - coalesce(ttft_ms, 0) ELSE 0 END) FROM usage GROUP BY ALL").fetchall(),
            con.execute("SELECT consumer, requested_model, coalesce(fallback_reason, 'unknown'), count(*) FROM usage WHERE fallback GROUP BY ALL ORDER BY 3").fetchall(),
        )
        rows.append(("ROI report (3 queries)", *side_by_side(roi, roi_duck)))
        for name, sql, *duck in adhoc:
            ours = lambda: call(addr, "POST", "/v1/sql", {"query": sql})
            theirs = lambda: con.execute(duck[0] if duck else sql).fetchall()
            rows.append((name, *side_by_side(ours, theirs)))
    finally:
        proc.terminate()
        proc.wait()

    lines = [
        "## Query service",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}, {BUILD} build, one run. "
        f"A lake of {EVENTS:,} events over {DAYS} days from `tollgate gen-lake` "
        f"({len(files):,} files, {size / 1e6:.1f} MB, **{size / EVENTS:.1f} bytes per event**; generated in {gen_s:.0f} s). "
        f"Each query: one warm-up, then the median of {RUNS} runs, hot, the two engines taking turns run by run. Tollgate is timed over HTTP "
        "(`tollgate query`, 2 threads, JSON answer included); DuckDB "
        f"{duckdb.__version__} in-process with `threads = 2` on the same files through `read_parquet(..., hive_partitioning = true)`. "
        "The reports are compared with the DuckDB queries that compute the same aggregates.",
        "",
        "| query | tollgate (DataFusion) | DuckDB | ratio | target |",
        "|---|---:|---:|---:|---|",
    ]
    for name, ours, theirs in rows:
        target = "≤ 1.0x" + (", < 1 s" if name.startswith("cost report") else "")
        lines.append(f"| {name} | {ours * 1000:,.0f} ms | {theirs * 1000:,.0f} ms | {ours / theirs:.2f}x | {target} |")
    text = "\n".join(lines)
    print(text)
    write_section("query", text)


if __name__ == "__main__":
    main()
