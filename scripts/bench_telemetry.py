"""What the gateway's telemetry costs: throughput and CPU per request with
request metrics off, metrics on (the default), and metrics plus
OpenTelemetry tracing exported over OTLP/HTTP to a local sink, measured side
by side in one run (see scripts/bench.sh telemetry).

The three gateways are the same binary with different `[telemetry]`
sections, all pinned to core 0; wrk, the simulator and the OTLP sink share
core 1. Each scenario runs every configuration in turn, ROUNDS times, the
order rotating, and reports the median, so drift on a shared machine falls
on all three alike.
"""

import os
import statistics
import sys
import time
import urllib.request

from bench import CHAT, GW_CORE, LOAD_CORE, SECONDS, WORK, cpu_ticks, gateway_config, machine, start, wrk
from benchmd import write_section

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CONNS = 64
CONFIGS = [
    ("off", "prometheus = false"),
    ("metrics", "prometheus = true"),
    ("metrics + tracing", None),  # filled with the sink's address
]

SINK = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(f"listening on http://127.0.0.1:{srv.server_address[1]}", flush=True)
srv.serve_forever()
"""


def scrape(addr, name):
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def main():
    sim, sim_addr = start(["simulate", "--listen", "127.0.0.1:0", "--output-tokens", "16"], "sim", LOAD_CORE)
    sink_path = os.path.join(WORK, "sink.py")
    open(sink_path, "w").write(SINK)
    sink, sink_addr = start([sink_path], "sink", LOAD_CORE, binary=sys.executable)
    procs = [sim, sink]
    gateways = {}
    try:
        for name, telemetry in CONFIGS:
            telemetry = telemetry or f'otlp_endpoint = "http://{sink_addr}"'
            path = gateway_config(name.replace(" ", "").replace("+", "-"), sim_addr)
            with open(path, "a") as f:
                f.write(f"[telemetry]\n{telemetry}\n")
            p, addr = start(["serve", "--config", path], name.replace(" ", "_"), GW_CORE)
            procs.append(p)
            gateways[name] = (p, addr)
        results = {}
        for stream in (False, True):
            body = {**CHAT, "stream": True} if stream else CHAT
            runs = {name: [] for name, _ in CONFIGS}
            for r in range(ROUNDS):
                order = [c[0] for c in CONFIGS]
                order = order[r % len(order):] + order[:r % len(order)]
                for name in order:
                    p, addr = gateways[name]
                    before = cpu_ticks(p.pid)
                    w = wrk(f"http://{addr}/v1/chat/completions", body, CONNS)
                    ticks = cpu_ticks(p.pid) - before
                    us = ticks / os.sysconf("SC_CLK_TCK") * 1e6 / max(w["requests"], 1)
                    runs[name].append((w["rps"], us, w["p99_us"], w["errors"]))
                    print(f"{'stream' if stream else 'json'} {name}: {w['rps']:.0f} req/s, {us:.1f} us/req", flush=True)
            results[stream] = {
                name: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v),
                       statistics.median(x[2] for x in v), sum(x[3] for x in v))
                for name, v in runs.items()}
        tracing_addr = gateways["metrics + tracing"][1]
        time.sleep(6)  # the last batch leaves
        exported = scrape(tracing_addr, "tollgate_otlp_spans_exported_total")
        dropped = (scrape(tracing_addr, "tollgate_otlp_spans_dropped_queue_full_total")
                   + scrape(tracing_addr, "tollgate_otlp_spans_dropped_export_failed_total"))
    finally:
        for p in procs:
            p.kill()
    report(results, exported, dropped)


def report(results, exported, dropped):
    lines = [
        "## Gateway telemetry: cost on and off\n",
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}, `{os.environ.get('BENCH_PROFILE', 'release')}` build, "
        f"`scripts/bench.sh telemetry` ({SECONDS} s per run, {ROUNDS} rounds, medians).\n",
        "### Method\n",
        "- One binary, three gateways: `[telemetry] prometheus = false` (*off*), the default (*metrics*: every request "
        "counted on `/metrics`), and metrics plus OpenTelemetry (*tracing*: a server span and a client span per request, "
        "GenAI metrics, exported over OTLP/HTTP to a local sink that accepts and discards). The gateways are pinned to "
        "core 0; wrk, the simulator and the sink share core 1.",
        f"- wrk at {CONNS} connections against each gateway in turn, the order rotating each round; CPU per request is the "
        "gateway process's utime+stime (its export threads included) over the run, divided by the requests completed.\n",
        "### Results\n",
        "| body | telemetry | req/s | vs off | CPU us/req | p99 ms | errors |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for stream, rows in results.items():
        off = rows["off"][0]
        for name, (rps, us, p99, errors) in rows.items():
            lines.append(f"| {'stream' if stream else 'json'} | {name} | {rps:.0f} | {rps / off:.3f} | {us:.1f} | "
                         f"{p99 / 1000:.2f} | {errors} |")
    lines.append(f"\nSpans the sink accepted: {exported:.0f}; dropped (queue full or failed export): {dropped:.0f}.\n")
    lines.append("### Targets\n")
    lines.append("| target | measured | met |")
    lines.append("|---|---:|---|")
    for stream, rows in results.items():
        body = "stream" if stream else "json"
        off = rows["off"][0]
        for name, goal in (("metrics", 0.97), ("metrics + tracing", 0.90)):
            ratio = rows[name][0] / off
            lines.append(f"| {body}: {name} throughput >= {goal:.2f}x off | {ratio:.3f} | {'yes' if ratio >= goal else 'no'} |")
    text = "\n".join(lines) + "\n"
    write_section("telemetry", text)
    print()
    print(text)


if __name__ == "__main__":
    main()
