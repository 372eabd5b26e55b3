"""Runs the usage-pipeline benchmark (see scripts/bench.sh) and writes its
section of BENCHMARKS.md.

A tansu broker (SQLite storage) is started on a free loopback port in a
scratch directory; `tollgate bench pipeline` measures, in one run, the
ingester's ceiling from memory, the lake's bytes per event, the tap's CPU
per event, the broker's produce and raw consume rates, the ingester's
Kafka -> Parquet rate on the same topic, and freshness through a gateway.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

from benchmd import write_section
from bench import machine


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    binary = sys.argv[1]
    events = int(os.environ.get("BENCH_EVENTS", "400000"))
    scratch = os.path.abspath("target/bench-pipeline")
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(f"{scratch}/broker")
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    broker = subprocess.Popen(
        ["tansu", "broker", "--storage-engine=sqlite://tansu.db", f"--listener-url={url}",
         f"--advertised-listener-url={url}", "--silent"],
        cwd=f"{scratch}/broker", stdout=subprocess.DEVNULL, stderr=open(f"{scratch}/broker/tansu.log", "w"))
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        out = subprocess.run(
            [binary, "bench", "pipeline", "--events", str(events), "--kafka", f"127.0.0.1:{port}",
             "--dir", f"{scratch}/run"],
            check=True, capture_output=True, text=True, env={**os.environ, "TOLLGATE_LOG": "warn"})
    finally:
        broker.kill()
    r = json.loads(out.stdout.strip().splitlines()[-1])
    with open(f"{scratch}/result.json", "w") as f:
        json.dump(r, f)
    report(r, events)


def report(r, events):
    lines = ["## Usage pipeline\n"]
    lines.append(f"Measured {time.strftime('%Y-%m-%d')} on {machine()}, release build, "
                 f"`scripts/bench.sh pipeline` ({events:,} synthetic events of a realistic mix: 12 consumers, "
                 "5 models, 60% streams, 5% fallbacks, 2% upstream errors, 10% cache hits).\n")
    lines.append("### Method\n")
    lines.append(
        "- **Ingest ceiling**: pre-serialized JSON events decoded and validated on one thread while the ingester's "
        "publisher thread turns the previous 100k-event batch into Arrow and Parquet (zstd, dictionaries, page "
        "statistics, time-sorted) and publishes it atomically, as the Kafka ingester does: what one ingester can "
        "do when the broker is not the limit.\n"
        "- **Kafka**: the same events produced to a 4-partition topic on a local tansu broker (SQLite storage); "
        "then a plain rdkafka consumer that only counts reads the topic from the start (the raw consume rate); "
        "then the ingester reads the same topic into a fresh lake. Its clock starts when the group assigns its "
        "partitions, so group-join time is not counted. Same broker, same data, same run.\n"
        "- **Bytes per event**: the lake's Parquet bytes over the events in it.\n"
        "- **Tap CPU per event**: process CPU (user + system) while 200k events go through `Tap::emit` -> JSON -> "
        "spool with group commit (fsync every 5 ms or 1,024 events), divided by the events.\n"
        "- **Freshness**: a gateway with the Kafka pipeline (default 2 s flush) answers "
        "100 requests/s for 20 s; each row's freshness is the time from its response to the moment "
        "its Parquet file is visible in the lake (polled every 25 ms).\n")
    lines.append("### Results\n")
    lines.append("| measure | value |")
    lines.append("|---|---:|")
    rows = [
        ("ingest from memory (events/s; decode and publish threads)", f"{r['memory_ingest_events_per_s']:,.0f}"),
        ("  decode + validate thread, busy (us/event)", f"{r['memory_decode_us_per_event']:.2f}"),
        ("  Arrow + Parquet + publish thread, busy (us/event)", f"{r['memory_publish_us_per_event']:.2f}"),
        ("Kafka produce (msgs/s)", f"{r['kafka_produce_msgs_per_s']:,.0f}"),
        ("Kafka raw consume, plain consumer (msgs/s)", f"{r['kafka_raw_consume_msgs_per_s']:,.0f}"),
        ("Kafka -> Parquet ingest (events/s)", f"{r['kafka_ingest_events_per_s']:,.0f}"),
        ("ingest / raw consume", f"{r['kafka_ingest_vs_raw']:.2f}x"),
        ("JSON bytes per event (Kafka message)", f"{r['json_bytes_per_event']:.0f}"),
        ("Parquet bytes per event", f"{r['parquet_bytes_per_event']:.1f}"),
        ("tap CPU per event (us)", f"{r['tap_cpu_us_per_event']:.2f}"),
        ("freshness p50 (ms)", f"{r['freshness_p50_ms']:,.0f}"),
        ("freshness p95 (ms)", f"{r['freshness_p95_ms']:,.0f}"),
        ("freshness rows seen / requests", f"{r['freshness_rows_seen']} / {r['freshness_requests']}"),
    ]
    lines += [f"| {a} | {b} |" for a, b in rows]
    lines.append("")
    checks = [
        ("ingest >= 0.5x raw consume from the same broker", r["kafka_ingest_vs_raw"] >= 0.5, f"{r['kafka_ingest_vs_raw']:.2f}x"),
        (">= 200k events/s from an in-memory source", r["memory_ingest_events_per_s"] >= 200_000, f"{r['memory_ingest_events_per_s']:,.0f}"),
        ("<= 40 bytes/event", r["parquet_bytes_per_event"] <= 40, f"{r['parquet_bytes_per_event']:.1f}"),
        ("freshness p95 <= 5 s", r["freshness_p95_ms"] <= 5000, f"{r['freshness_p95_ms']:,.0f} ms"),
        ("the tap adds <= 5 us per request", r["tap_cpu_us_per_event"] <= 5, f"{r['tap_cpu_us_per_event']:.2f} us"),
    ]
    lines.append("### Targets\n")
    lines.append("| target | measured | met |")
    lines.append("|---|---:|---|")
    lines += [f"| {n} | {v} | {'yes' if ok else 'no'} |" for n, ok, v in checks]
    lines.append("")
    lines.append(NOTES)
    text = "\n".join(lines)
    write_section("pipeline", text)
    print(text)


NOTES = """### Reading the figures

- These machines are shared and noisy: across runs on the same build the tap
  figure ranged 3.7-5.5 us and the in-memory ingest 121k-145k events/s.
- The tap's figure is CPU spent per event by the whole tap path (the request
  path's `emit` plus the writer thread's JSON encoding, framing, checksum and
  its share of the group-commit `fdatasync`), not time added to a request: the
  request path only pushes a boxed event into a bounded queue.
- The broker, not the ingester, bounds Kafka ingest on this machine; the
  in-memory ceiling shows the ingester's own headroom. Both share 2 cores with
  the broker during the Kafka runs.
- Bytes per event depend on the mix: ids and timestamps are most of it (the
  event id alone is ~12 bytes after compression); a single successful attempt
  is stored once, in the top-level fields.
"""

if __name__ == "__main__":
    main()
