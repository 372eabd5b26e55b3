"""Runs the gateway benchmark (see scripts/bench.sh) and writes BENCHMARKS.md.

Layout on a 2-core machine: the gateway is pinned to core 0; the load
generator and the simulator share core 1. "direct" = load generator ->
simulator; "gateway" = load generator -> gateway -> simulator. Both run in
this one invocation, so their ratio is meaningful on a shared, noisy machine.

BENCH_BASELINE=/path/to/another/tollgate runs that build as a second gateway
beside this one (same core, taken in turns, the order alternating between
scenarios), and adds a section comparing the two: a regression check
measured side by side, plus instructions per request counted by valgrind's
callgrind for both builds, which the machine's noise does not move.
BENCH_BASELINE_LABEL names it (e.g. a commit).
"""

from benchmd import write_section
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

BIN = sys.argv[1]
BASELINE = os.environ.get("BENCH_BASELINE")
BASELINE_LABEL = os.environ.get("BENCH_BASELINE_LABEL", "baseline")
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
GW_CORE, LOAD_CORE = "0", "1"
KEY = "tg-bench-" + os.urandom(8).hex()
WORK = tempfile.mkdtemp(prefix="tollgate-bench-")
CHAT = {"model": "qwq-32b", "messages": [{"role": "user", "content": "Summarise the gateway's cost per consumer for last week."}]}


def start(args, name, core, binary=BIN):
    out = open(os.path.join(WORK, name + ".out"), "w+")
    p = subprocess.Popen(["taskset", "-c", core, binary, *args], stdout=out, stderr=subprocess.STDOUT,
                         env={**os.environ, "TOLLGATE_LOG": "warn"})
    for _ in range(300):
        out.seek(0)
        m = re.search(r"listening on http://(\S+)", out.read())
        if m:
            return p, m.group(1)
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not start")


def wrk(url, body, conns, auth=True):
    script = os.path.join(WORK, "post.lua")
    headers = 'wrk.headers["Content-Type"] = "application/json"\n'
    if auth:
        headers += f'wrk.headers["Authorization"] = "Bearer {KEY}"\n'
    with open(script, "w") as f:
        f.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(json.dumps(body))}\n{headers}')
    threads = 1 if conns == 1 else 2
    out = subprocess.run(["taskset", "-c", LOAD_CORE, "wrk", "-t", str(threads), "-c", str(conns), "-d", f"{SECONDS}s",
                          "--latency", "-s", script, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = sum(int(x) for x in re.findall(r"(?:Non-2xx or 3xx responses|Socket errors:.*?timeout) (\d+)", out))
    lat = {p: to_us(v) for p, v in re.findall(r"\s(50|99)%\s+([\d.]+\w+)", out)}
    return {"rps": rps, "requests": total, "errors": errors, "p50_us": lat.get("50"), "p99_us": lat.get("99")}


def to_us(v):
    n, unit = re.match(r"([\d.]+)(\w+)", v).groups()
    return float(n) * {"us": 1, "ms": 1000, "s": 1_000_000}[unit]


def gateway_config(name, sim_addr, slow_addr=None):
    """Writes a `tollgate serve` config for the bench consumer, with its
    spool and lake under WORK/name; returns its path. `qwq-32b` goes to the
    simulator at `sim_addr`, `slow-stream` to the one at `slow_addr`."""
    def route(upstream, addr, model):
        return (f'[upstreams.{upstream}]\nkind = "openai"\nbase_url = "http://{addr}/v1"\n'
                f'[[routes]]\nmodel = "{model}"\ntargets = [{{ upstream = "{upstream}" }}]\n')
    routes = route("sim", sim_addr, "qwq-32b") + (route("slow", slow_addr, "slow-stream") if slow_addr else "")
    config = (f'[gateway]\nlisten = "127.0.0.1:0"\ninstance = "bench"\n'
              f'[pipeline]\nspool_dir = "{WORK}/{name}/spool"\nlake = "{WORK}/{name}/lake"\n{routes}'
              f'[[consumers]]\nname = "bench"\napi_keys = ["sha256:{hashlib.sha256(KEY.encode()).hexdigest()}"]\n')
    path = os.path.join(WORK, name + ".toml")
    open(path, "w").write(config)
    return path


def callgrind_per_request(binary, sim_addr, stream, n=300, config=None, warmup=0):
    """Instructions per request executed by the gateway's runtime workers
    (everything under tokio's `run_task`: the proxy, hyper and reqwest),
    counted by valgrind's callgrind: the same for the same build and load,
    whatever else the machine is doing."""
    name = f"cg-{'stream' if stream else 'json'}-{os.path.basename(binary)}-{time.time_ns()}"
    config = config or gateway_config(name, sim_addr)
    out_file = os.path.join(WORK, name + ".callgrind")
    log = open(os.path.join(WORK, name + ".out"), "w+")
    p = subprocess.Popen(["valgrind", "--tool=callgrind", "--collect-atstart=no", "--toggle-collect=*Context*run_task*",
                          f"--callgrind-out-file={out_file}", binary, "serve", "--config", config],
                         stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TOLLGATE_LOG": "warn"})
    addr = None
    for _ in range(1200):
        log.seek(0)
        m = re.search(r"listening on http://(\S+)", log.read())
        if m:
            addr = m.group(1)
            break
        time.sleep(0.05)
    import http.client
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({**CHAT, "stream": stream})
    for i in range(warmup + n):
        if i == warmup and warmup:
            # Steady state only: one-time work (a tokenizer's tables) left out.
            subprocess.run(["callgrind_control", "-z", str(p.pid)], capture_output=True, check=True)
        conn.request("POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        assert r.status == 200, r.status
    p.terminate()
    p.wait()
    total = int(re.search(r"^summary: (\d+)", open(out_file).read(), re.M).group(1))
    return total / n


def cpu_ticks(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def status_kb(pid, key):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def loadgen(url, **kw):
    args = ["taskset", "-c", LOAD_CORE, BIN, "bench", "loadgen", "--url", url, "--key", KEY]
    for k, v in kw.items():
        if v is True:
            args.append("--" + k.replace("_", "-"))
        else:
            args += ["--" + k.replace("_", "-"), str(v)]
    return json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout)


def main():
    sim, sim_addr = start(["simulate", "--listen", "127.0.0.1:0", "--output-tokens", "16"], "sim", LOAD_CORE)
    slow, slow_addr = start(["simulate", "--listen", "127.0.0.1:0", "--output-tokens", "60", "--tokens-per-s", "4"],
                            "slow", LOAD_CORE)
    def gateway(name, binary):
        return start(["serve", "--config", gateway_config(name, sim_addr, slow_addr)], name, GW_CORE, binary)

    gw, gw_addr = gateway("gateway", BIN)
    direct_url = f"http://{sim_addr}/v1/chat/completions"
    gw_url = f"http://{gw_addr}/v1/chat/completions"
    base, base_url = None, None
    if BASELINE:
        base, base_addr = gateway("baseline", BASELINE)
        base_url = f"http://{base_addr}/v1/chat/completions"

    rows = []
    compared = []
    instructions = []
    try:
        turn = 0
        for stream in (False, True):
            body = {**CHAT, "stream": stream}
            for conns in (1, 64, 256):
                d = wrk(direct_url, body, conns, auth=False)
                order = [("this", gw, gw_url), ("base", base, base_url)] if base else [("this", gw, gw_url)]
                if turn % 2:
                    order.reverse()
                turn += 1
                measured = {}
                for who, proc, url in order:
                    t0 = cpu_ticks(proc.pid)
                    g = wrk(url, body, conns)
                    ticks = cpu_ticks(proc.pid) - t0
                    measured[who] = (g, ticks * (1_000_000 / os.sysconf("SC_CLK_TCK")) / max(g["requests"], 1))
                g, us_per_req = measured["this"]
                rows.append((stream, conns, d, g, us_per_req))
                print(f"{'stream' if stream else 'json':6} c={conns:<4} direct {d['rps']:>9.0f} rps  gateway {g['rps']:>9.0f} rps"
                      f"  ratio {g['rps'] / d['rps']:.2f}  gw cpu {us_per_req:.1f} us/req", flush=True)
                if base:
                    b, b_us = measured["base"]
                    compared.append((stream, conns, b, b_us, g, us_per_req))
                    print(f"{'':6} {'':6} {BASELINE_LABEL} {b['rps']:>9.0f} rps  this/{BASELINE_LABEL} {g['rps'] / b['rps']:.2f}"
                          f"  cpu {b_us:.1f} -> {us_per_req:.1f} us/req", flush=True)
        steady_hwm = status_kb(gw.pid, "VmHWM")

        fixed = {}
        for stream in (False, True):
            kw = {"rate": 1000, "duration_s": SECONDS, "model": "qwq-32b"}
            if stream:
                kw["stream"] = True
            fixed[(stream, "direct")] = loadgen(direct_url, **kw)
            fixed[(stream, "gateway")] = loadgen(gw_url, **kw)
            if base:
                fixed[(stream, "base")] = loadgen(base_url, **kw)
            print(f"1000 req/s {'stream' if stream else 'json'}: direct {fixed[(stream, 'direct')]}  gateway {fixed[(stream, 'gateway')]}",
                  flush=True)
        if base:
            base.terminate()
            base.wait()
            base = None
            if shutil.which("valgrind"):
                for stream in (False, True):
                    counts = [callgrind_per_request(b, sim_addr, stream) for b in (BASELINE, BIN)]
                    instructions.append((stream, *counts))
                    print(f"instructions/request {'stream' if stream else 'json'}: {BASELINE_LABEL} {counts[0]:.0f}  "
                          f"this {counts[1]:.0f}  ratio {counts[1] / counts[0]:.3f}", flush=True)

        rss_before = status_kb(gw.pid, "VmRSS")
        holder = subprocess.Popen(["taskset", "-c", LOAD_CORE, BIN, "bench", "loadgen", "--url", gw_url, "--key", KEY,
                                   "--model", "slow-stream", "--stream", "--rate", "0", "--open", "1000"],
                                  stdout=subprocess.PIPE, text=True)
        peak_open = 0
        for _ in range(100):
            time.sleep(0.1)
            peak_open = max(peak_open, status_kb(gw.pid, "VmRSS"))
        held = json.loads(holder.communicate(timeout=120)[0])
        print(f"1000 open streams: rss {peak_open / 1024:.1f} MB ({held})", flush=True)
    finally:
        procs = [p for p in (gw, sim, slow, base) if p]
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()

    write_report(rows, fixed, steady_hwm, rss_before, peak_open, held, compared, instructions)


NOTES = """### Reading the figures

- The gateway runs as `tollgate serve` does for a user: the spool's group
  commits (fsync) and the embedded ingester (Arrow, Parquet, zstd) share its
  process and its one core. Per-request CPU, tail latency (the ingester
  flushes a batch every 2 s) and RSS (its batch buffers) include the whole
  ledger pipeline. The targets were set, and met, when events went to a
  JSON-lines file; figures from before that change are not comparable.
- *direct* is one hyper server (the simulator) answering from memory; the
  gateway does the same server work plus a full HTTP client exchange and the
  ledger, on one core. In a profile of the gateway at 64 connections the
  kernel's loopback networking is over half of its CPU (two sends per
  request, each also delivering to the receiver); the rest is spread over
  hyper (server and client), reqwest, JSON, the event and the ingester.
- A change's cost is read from the side-by-side section: both builds run the
  same pipeline on the same core in the same run, and callgrind's
  instruction counts for them do not move with the machine's load.
- Streams: the simulator produces all 16 events at once and its server writes
  them in one batch; the gateway relays each event as it arrives (it may not
  wait to fill a buffer), which is one client write per event when the
  upstream's body arrives chunk by chunk. Against a paced upstream (real
  models emit 20-100 tokens/s) this per-event write happens anyway.
- Candidates to close the gap, not tried yet: a hyper-util client
  instead of reqwest, yielding once before each flush so that chunks already
  on the socket go out in one write, and the ingester on a core of its own.
"""


def machine():
    cpu = "unknown"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(open("/proc/meminfo").readline().split()[1]) // 1024 // 1024
    return f"{os.cpu_count()} cores ({cpu}), {mem} GiB RAM, Linux {platform.release()}"


def ms(us):
    return f"{us / 1000:.2f}" if us is not None else "-"


def write_comparison(lines, compared, fixed, instructions):
    lines.append(f"### Against {BASELINE_LABEL}, side by side\n")
    lines.append(f"The build `{BASELINE_LABEL}` ran as a second gateway on the same core in the same run, "
                 "each scenario measured on both in turn (the order alternating), against the same simulator.\n")
    lines.append(f"| body | conns | {BASELINE_LABEL} req/s | this req/s | this/{BASELINE_LABEL} | "
                 f"{BASELINE_LABEL} p99 ms | this p99 ms | {BASELINE_LABEL} CPU us/req | this CPU us/req |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for stream, conns, b, b_us, g, g_us in compared:
        lines.append(f"| {'stream' if stream else 'json'} | {conns} | {b['rps']:.0f} | {g['rps']:.0f} | {g['rps'] / b['rps']:.2f} | "
                     f"{ms(b['p99_us'])} | {ms(g['p99_us'])} | {b_us:.1f} | {g_us:.1f} |")
    lines.append("")
    if instructions:
        lines.append("Instructions per request in the gateway's runtime workers (the proxy, hyper and reqwest; "
                     "valgrind callgrind, 300 sequential requests each; an exact count, unaffected by the machine's noise):\n")
        lines.append(f"| body | {BASELINE_LABEL} | this | this/{BASELINE_LABEL} |")
        lines.append("|---|---:|---:|---:|")
        for stream, b, g in instructions:
            lines.append(f"| {'stream' if stream else 'json'} | {b:,.0f} | {g:,.0f} | {g / b:.3f} |")
        lines.append("")
    lines.append(f"| at 1,000 req/s | {BASELINE_LABEL} | this |")
    lines.append("|---|---:|---:|")
    for stream in (False, True):
        b, g = fixed[(stream, "base")], fixed[(stream, "gateway")]
        keys = ["latency_p50_us", "latency_p99_us"] + (["ttfb_p50_us", "ttfb_p99_us"] if stream else [])
        for k in keys:
            lines.append(f"| {'stream' if stream else 'json'} {k.replace('_us', '').replace('_', ' ')} | {ms(b[k])} ms | {ms(g[k])} ms |")
    lines.append("")


def write_report(rows, fixed, steady_hwm, rss_before, peak_open, held, compared, instructions):
    lines = []
    lines.append("## Gateway\n")
    profile = os.environ.get("BENCH_PROFILE", "release")
    lines.append(f"Measured {time.strftime('%Y-%m-%d')} on {machine()}, `{profile}` build, `scripts/bench.sh` "
                 f"({SECONDS} s per run).\n")
    lines.append("### Method\n")
    lines.append(
        "- Upstream: `tollgate simulate` with zero latency and 16 output tokens per completion "
        "(streams: one SSE event per token, usage chunk, `[DONE]`).\n"
        "- The gateway is pinned to core 0 (`taskset`); the load generator and the simulator share core 1. "
        "*direct* = load generator -> simulator; *gateway* = load generator -> gateway -> simulator. "
        "Both are measured in the same run, so the ratio holds on a noisy shared machine.\n"
        "- Throughput and closed-loop latency: `wrk` (Debian) with a POST body, keep-alive connections. "
        "The gateway authenticates the key, parses and rewrites the body, injects `include_usage` on streams, "
        "relays, renames the model, strips the usage chunk and writes one usage event per request into its spool; "
        "`tollgate serve`'s embedded ingester turns them into Parquet in the same process, on the same core.\n"
        "- Gateway CPU per request: utime+stime of the gateway process (`/proc/PID/stat`) over the gateway run, "
        "divided by the requests wrk completed.\n"
        "- Fixed rate: `tollgate bench loadgen` (open loop, 1,000 req/s, new request every 1 ms regardless of responses) "
        "direct vs. gateway; time to first byte is the first body chunk of a stream.\n"
        "- Memory: the gateway's VmHWM after the throughput runs; VmRSS while 1,000 streams are held open "
        "(a simulator at 4 tokens/s keeps each open ~15 s).\n")
    lines.append("### Throughput (wrk)\n")
    lines.append("| body | conns | direct req/s | gateway req/s | gateway/direct | direct p50 / p99 ms | gateway p50 / p99 ms | gateway CPU us/req |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for stream, conns, d, g, us in rows:
        lines.append(f"| {'stream' if stream else 'json'} | {conns} | {d['rps']:.0f} | {g['rps']:.0f} | {g['rps'] / d['rps']:.2f} | "
                     f"{ms(d['p50_us'])} / {ms(d['p99_us'])} | {ms(g['p50_us'])} / {ms(g['p99_us'])} | {us:.1f} |")
    lines.append("")
    c1 = [r for r in rows if r[1] == 1]
    if compared:
        write_comparison(lines, compared, fixed, instructions)
    lines.append("### Latency added by the gateway\n")
    lines.append("| measure | direct | gateway | added |")
    lines.append("|---|---:|---:|---:|")
    for stream, _, d, g, _ in c1:
        for p in ("p50", "p99"):
            lines.append(f"| {'stream' if stream else 'json'}, concurrency 1, {p} (wrk) | {ms(d[p + '_us'])} ms | {ms(g[p + '_us'])} ms | "
                         f"{(g[p + '_us'] - d[p + '_us']):.0f} us |")
    for stream in (False, True):
        d, g = fixed[(stream, "direct")], fixed[(stream, "gateway")]
        for p in ("p50", "p99"):
            lines.append(f"| {'stream' if stream else 'json'}, 1,000 req/s, latency {p} | {ms(d['latency_' + p + '_us'])} ms | "
                         f"{ms(g['latency_' + p + '_us'])} ms | {g['latency_' + p + '_us'] - d['latency_' + p + '_us']} us |")
        if stream:
            for p in ("p50", "p99"):
                lines.append(f"| stream, 1,000 req/s, time to first byte {p} | {ms(d['ttfb_' + p + '_us'])} ms | "
                             f"{ms(g['ttfb_' + p + '_us'])} ms | {g['ttfb_' + p + '_us'] - d['ttfb_' + p + '_us']} us |")
    lines.append("")
    lines.append("Requests and errors at 1,000 req/s: " + ", ".join(
        f"{'stream' if s else 'json'} {w} {r['requests']} req / {r['errors']} errors / {r['skipped']} skipped"
        for (s, w), r in fixed.items() if w != "base") + ".\n")
    lines.append("### Memory\n")
    lines.append("| measure | gateway |")
    lines.append("|---|---:|")
    lines.append(f"| peak RSS after the throughput runs (up to 256 connections) | {steady_hwm / 1024:.1f} MB |")
    lines.append(f"| RSS before opening 1,000 streams | {rss_before / 1024:.1f} MB |")
    lines.append(f"| RSS with 1,000 streams open | {peak_open / 1024:.1f} MB |")
    lines.append(f"\n1,000 streams: {held['requests']} completed, {held['errors']} errors.\n")
    by = {(s, c): (d, g, us) for s, c, d, g, us in rows}
    fj, fs = (fixed[(False, "direct")], fixed[(False, "gateway")]), (fixed[(True, "direct")], fixed[(True, "gateway")])
    checks = [
        ("throughput >= 0.9x direct, json, 64 connections", by[(False, 64)][1]["rps"] / by[(False, 64)][0]["rps"], 0.9, ">="),
        ("throughput >= 0.9x direct, stream, 64 connections", by[(True, 64)][1]["rps"] / by[(True, 64)][0]["rps"], 0.9, ">="),
        ("gateway CPU per json request (64 connections) <= 50 us", by[(False, 64)][2], 50, "<="),
        ("added p99 at concurrency 1 (json) <= 150 us", by[(False, 1)][1]["p99_us"] - by[(False, 1)][0]["p99_us"], 150, "<="),
        ("added p99 at 1,000 req/s (json) <= 1000 us", fj[1]["latency_p99_us"] - fj[0]["latency_p99_us"], 1000, "<="),
        ("added time to first byte p99 at 1,000 req/s <= 300 us", fs[1]["ttfb_p99_us"] - fs[0]["ttfb_p99_us"], 300, "<="),
        ("RSS at steady load <= 64 MB", steady_hwm / 1024, 64, "<="),
        ("RSS with 1,000 open streams <= 100 MB", peak_open / 1024, 100, "<="),
    ]
    lines.append("### Targets\n")
    lines.append("| target | measured | met |")
    lines.append("|---|---:|---|")
    for name, value, bound, op in checks:
        met = value >= bound if op == ">=" else value <= bound
        lines.append(f"| {name} | {value:.2f} | {'yes' if met else 'no'} |")
    lines.append("")
    lines.append(NOTES)
    text = "\n".join(lines)
    write_section("gateway", text)
    print()
    print(text)


if __name__ == "__main__":
    main()
