"""What limits and budgets cost on the request path: throughput and CPU per
request with no rules, with five rules counted in process, and with the same
five rules shared through Redis, measured side by side in one run (see
scripts/bench.sh limits).

The five rules never trip (their limits are far above the load), so every
request pays for a full admission and settlement and nothing else changes.
The gateways are pinned to core 0; wrk, the simulator and Redis share core 1.
Each configuration runs in turn, ROUNDS times, the order rotating; medians.
"""

import os
import shutil
import socket
import statistics
import subprocess
import time

import bench
from bench import CHAT, GW_CORE, LOAD_CORE, SECONDS, WORK, cpu_ticks, gateway_config, machine, start, wrk
from benchmd import write_section

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CONNS = 64

RULES = """
[[rate_limits]]
name = "tokens-per-consumer"
key = "consumer"
tokens_per_minute = 1000000000000

[[rate_limits]]
name = "requests-global"
key = "global"
requests_per_second = 1000000000

[[rate_limits]]
name = "usd-per-ip"
key = "ip"
usd_per_day = "100000"

[[rate_limits]]
name = "qwq-hourly"
model = "qwq-*"
key = "consumer"
tokens_per_hour = 1000000000000
requests_per_hour = 1000000000000

[[budgets]]
name = "monthly"
usd = "500000"
period = "month"
timezone = "Asia/Shanghai"
"""

NOTES = """### Reading the figures

- Five rules take every request (six counters: one rule has two figures): an admission reserves the estimate in all of them at once (one lock in process, one `EVALSHA` with Redis), and the request's end settles each to what it used (in process under the same lock; with Redis, summed per counter in memory and sent every 20 ms in one pipelined batch, off the request path).
- In process, the admission and settlement cost about 27,000 instructions per request (+21% at this bench's ceiling of some 15,000 requests per second on one core): the prompt's token count for the estimate (tiktoken; counts of texts seen before come from a keyed cache, which this bench's repeated prompt always hits, so a stream of new prompts pays the tokenizer on top), pricing the estimate for the dollar rules, six counters under one lock, the `x-ratelimit-*` headers, and the settlement. At the rates an LLM gateway sees per core (hundreds of requests per second), that is about 10 us per request, under 0.2% of a core at 200 req/s.
- With Redis, the gateway's own CPU per request is about the same as in process (the redis client's encoding and decoding replace the local lock); the throughput loss on this 2-core machine is mostly Redis itself sharing core 1 with wrk and the simulator. The callgrind column counts the client's work in the gateway (about 60,000 instructions a request).
- Not met: the in-process (<= 3%) and Redis (<= 15%) throughput goals at this ceiling. Not tried yet: a cheaper pre-call token estimate than tiktoken, a per-request allocation-free key path, pre-formatted headers.
- Overshoot without `max_tokens` (`tests/python/test_limits.py`, two gateways sharing Redis, 200 concurrent requests against 2,000 tokens per minute, each reserving its prompt plus a default of 4 output tokens and using 16): the R1 rule admitted 117 requests that used 3,393 tokens, 1,393 over the limit, within the bound of 12 tokens of estimate error per request in flight (1,404); the QwQ fallback's own rule, 407 over with 83 requests. With `max_tokens` set, the same burst stayed at or under the limit.
- Wall-clock ratios move by several percent between runs on this shared machine; the instruction counts do not.
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_info(port, section):
    out = subprocess.run(["redis-cli", "-p", str(port), "INFO", section], capture_output=True, text=True,
                         check=True).stdout
    return dict(line.split(":", 1) for line in out.splitlines() if ":" in line and not line.startswith("#"))


def evalsha_calls(port):
    stats = redis_info(port, "commandstats").get("cmdstat_evalsha", "calls=0")
    return int(stats.split("calls=")[1].split(",")[0])


def commands(port):
    return int(redis_info(port, "stats").get("total_commands_processed", "0"))


def main():
    sim, sim_addr = start(["simulate", "--listen", "127.0.0.1:0", "--output-tokens", "16"], "sim", LOAD_CORE)
    port = free_port()
    rdir = os.path.join(WORK, "redis")
    shutil.rmtree(rdir, ignore_errors=True)
    os.makedirs(rdir)
    redis = subprocess.Popen(["taskset", "-c", LOAD_CORE, "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", rdir],
                             stdout=open(os.path.join(rdir, "log"), "w"), stderr=subprocess.STDOUT)
    time.sleep(0.5)
    configs = [("none", ""), ("5 rules in process", RULES),
               ("5 rules, Redis", f'[redis]\nurl = "redis://127.0.0.1:{port}/0"\n' + RULES)]
    procs = [sim, redis]
    gateways, instructions = {}, {}
    try:
        for name, extra in configs:
            for role in ("cg", "wrk"):
                path = gateway_config(f"{role}-limits-" + name.replace(" ", "").replace(",", ""), sim_addr)
                with open(path, "a") as f:
                    f.write(extra)
                if role == "cg":
                    time.sleep(0.3)
                    instructions[name] = bench.callgrind_per_request(bench.BIN, sim_addr, False, n=400, config=path,
                                                                     warmup=20)
                    print(f"{name}: {instructions[name]:.0f} instructions/request", flush=True)
                else:
                    p, addr = start(["serve", "--config", path], "limits-" + name.replace(" ", "_"), GW_CORE)
                    procs.append(p)
                    gateways[name] = (p, addr)
        time.sleep(1)  # the Redis connections are up
        results = {}
        trips = {}
        for stream in (False, True):
            body = {**CHAT, "stream": True} if stream else CHAT
            runs = {name: [] for name, _ in configs}
            for r in range(ROUNDS):
                order = [c[0] for c in configs]
                order = order[r % len(order):] + order[:r % len(order)]
                for name in order:
                    p, addr = gateways[name]
                    before, calls, cmds = cpu_ticks(p.pid), evalsha_calls(port), commands(port)
                    w = wrk(f"http://{addr}/v1/chat/completions", body, CONNS)
                    ticks = cpu_ticks(p.pid) - before
                    us = ticks / os.sysconf("SC_CLK_TCK") * 1e6 / max(w["requests"], 1)
                    runs[name].append((w["rps"], us, w["p99_us"], w["errors"]))
                    if "Redis" in name:
                        time.sleep(0.5)  # the last settlements leave
                        trips.setdefault(stream, []).append(
                            ((evalsha_calls(port) - calls) / max(w["requests"], 1),
                             (commands(port) - cmds) / max(w["requests"], 1)))
                    print(f"{'stream' if stream else 'json'} {name}: {w['rps']:.0f} req/s, {us:.1f} us/req", flush=True)
            results[stream] = {
                name: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v),
                       statistics.median(x[2] for x in v), sum(x[3] for x in v))
                for name, v in runs.items()}
    finally:
        for p in procs:
            p.kill()
    report(results, instructions, trips)


def report(results, instructions, trips):
    lines = [
        "## Limits and budgets: cost on and off\n",
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}, `{os.environ.get('BENCH_PROFILE', 'release')}` build, "
        f"`scripts/bench.sh limits` ({SECONDS} s per run, {ROUNDS} rounds, medians).\n",
        "### Method\n",
        "- One binary, three gateways: no rules (*none*), five rules that take every request and never trip, counted "
        "in process, and the same five shared through a local `redis-server` (Debian's). Gateways pinned to core 0; "
        "wrk, the simulator and Redis share core 1.",
        f"- wrk at {CONNS} connections against each gateway in turn, the order rotating each round; CPU per request is "
        "the gateway process's utime+stime over the run, divided by the requests completed. Redis round trips per "
        "request: `EVALSHA` calls (the admission, on the request path) over requests; Redis commands per request "
        "include the settlements, pipelined off the request path.\n",
        "### Results\n",
        "| body | rules | req/s | vs none | CPU us/req | p99 ms | errors |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for stream, rows in results.items():
        none = rows["none"][0]
        for name, (rps, us, p99, errors) in rows.items():
            lines.append(f"| {'stream' if stream else 'json'} | {name} | {rps:.0f} | {rps / none:.3f} | {us:.1f} | "
                         f"{p99 / 1000:.2f} | {errors} |")
    lines.append("")
    for stream, t in trips.items():
        rt = statistics.median(x[0] for x in t)
        cmds = statistics.median(x[1] for x in t)
        lines.append(f"Redis, {'stream' if stream else 'json'}: {rt:.3f} `EVALSHA` calls per request (the admission's "
                     f"one on the request path, plus the settlement batches sent every 20 ms off it); {cmds:.1f} commands "
                     f"per request as Redis counts them (the `HGET`/`HINCRBY` inside the scripts included).")
    lines.append("")
    lines.append("Instructions per json request in the gateway's runtime workers (valgrind callgrind, 400 sequential "
                 "requests after 20 to warm up; exact, unaffected by the machine's noise; the Redis settlement task "
                 "included):\n")
    lines.append("| rules | instructions/request | vs none |")
    lines.append("|---|---:|---:|")
    for name, n in instructions.items():
        lines.append(f"| {name} | {n:,.0f} | {n / instructions['none']:.3f} |")
    lines.append("")
    lines.append("### Targets\n")
    lines.append("| target | measured | met |")
    lines.append("|---|---:|---|")
    for stream, rows in results.items():
        body = "stream" if stream else "json"
        none = rows["none"][0]
        for name, goal in (("5 rules in process", 0.97), ("5 rules, Redis", 0.85)):
            ratio = rows[name][0] / none
            lines.append(f"| {body}: {name} throughput >= {goal:.2f}x none | {ratio:.3f} | {'yes' if ratio >= goal else 'no'} |")
    for stream, t in trips.items():
        rt = statistics.median(x[0] for x in t)
        # One call per admission; what is above 1 is the settlement batches.
        lines.append(f"| {'stream' if stream else 'json'}: Redis round trips on the request path <= 1 "
                     f"(`EVALSHA` calls per request, batches included) | {rt:.3f} | {'yes' if rt < 1.05 else 'no'} |")
    for name, goal in (("5 rules in process", 1.03), ("5 rules, Redis", 1.15)):
        ratio = instructions[name] / instructions["none"]
        lines.append(f"| json: {name} instructions/request <= {goal:.2f}x none | {ratio:.3f} | {'yes' if ratio <= goal else 'no'} |")
    lines.append("")
    lines.append(NOTES)
    text = "\n".join(lines) + "\n"
    write_section("limits", text)
    print()
    print(text)


if __name__ == "__main__":
    main()
