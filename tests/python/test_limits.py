"""Rate limits and budgets against a real Redis (Debian's redis-server, one per
test on its own loopback port) and real gateway processes: two gateways
sharing counters never admit more than the limit under concurrency, a USD
budget ends at or under its amount, a gateway killed with SIGKILL comes back
with the same budget spend (rebuilt from the ledger), a cancelled stream
settles to what was generated, and Redis killed mid-traffic costs no 5xx and
is reconciled when it returns."""

import concurrent.futures
import json
import os
import pathlib
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import duckdb
import pytest

from conftest import ADMIN_TOKEN, KEY, UPSTREAM_KEY, Proc, free_port, sha, upstream

ENV = {"UPSTREAM_KEY": UPSTREAM_KEY, "TOLLGATE_ADMIN_TOKEN": ADMIN_TOKEN}
BILLING_KEY = "tg-canary-python-billing-5e4d3c2b"


class Redis:
    """A redis-server on a loopback port; `persist` keeps an fsynced AOF so
    a SIGKILL loses nothing acknowledged."""

    def __init__(self, directory, persist=False):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.persist = persist
        self.start()

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--dir", str(self.dir), "--appendonly", "yes" if self.persist else "no",
                "--appendfsync", "always"]
        self.p = subprocess.Popen(args, stdout=open(self.dir / "redis.log", "ab"), stderr=subprocess.STDOUT)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self):
        self.p.kill()
        self.p.wait()

    stop = kill


def gateway(directory, name, sim, rules, redis=None, query=False, lake=None, pipeline=""):
    """A `tollgate serve` with one R1-like upstream, R1 and QwQ routes, the
    python-app consumer (team search) and `rules`; its own lake unless
    `lake` is given."""
    d = directory / name
    lake = lake or d / "lake"
    d.mkdir(parents=True, exist_ok=True)
    shared = f'[redis]\nurl = "{redis.url}"\ntimeout_ms = 200\n\n' if redis else ""
    if query:
        shared += ('[query]\nlisten = "127.0.0.1:0"\npg_listen = "127.0.0.1:0"\n'
                   'admin_token = "${TOLLGATE_ADMIN_TOKEN}"\n\n')
    config = f"""
[gateway]
listen = "127.0.0.1:0"
instance = "{name}"
admin_token = "${{TOLLGATE_ADMIN_TOKEN}}"

[pipeline]
spool_dir = "{d / "spool"}"
lake = "{lake}"
flush_ms = 100
{pipeline}

{shared}{upstream("r1", sim.addr)}
[[routes]]
model = "deepseek-r1"
targets = [{{ upstream = "r1", model = "deepseek-reasoner" }}]

[[routes]]
model = "qwq-32b"
targets = [{{ upstream = "r1", model = "qwq-32b" }}]

[[consumers]]
name = "python-app"
team = "search"
api_keys = ["{sha(KEY)}"]

[[consumers]]
name = "billing-app"
team = "billing"
api_keys = ["{sha(BILLING_KEY)}"]

{rules}
"""
    path = d / "tollgate.toml"
    path.write_text(config)
    gw = Proc(["serve", "--config", str(path)], d / "gateway.log", ENV)
    gw.lake = lake
    gw.config = path
    return gw


def shared_gateways(directory, procs, sim, rules, redis, *names):
    """Gateways named `names` sharing `redis`, each once it uses Redis."""
    gws = [gateway(directory, name, sim, rules, redis) for name in names]
    procs.extend(gws)
    for gw in gws:
        wait_for(lambda gw=gw: metric(gw.addr, "tollgate_limits_redis_up") == 1, "Redis in use")
    return gws


def simulator(directory, *extra, output=16):
    return Proc(["simulate", "--listen", "127.0.0.1:0", "--output-tokens", str(output), "--reasoning-tokens", "6",
                 "--usage-style", "deepseek", *extra], directory / "sim.log", {"TOLLGATE_SIM_API_KEY": UPSTREAM_KEY})


def chat(addr, model="deepseek-r1", max_tokens=None, stream=False, tags=None):
    body = {"model": model, "messages": [{"role": "user", "content": "How much did search spend?"}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if stream:
        body["stream"] = True
    req = urllib.request.Request(f"http://{addr}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    if tags:
        req.add_header("x-tollgate-tags", tags)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def tokens_of(body):
    u = json.loads(body)["usage"]
    return u["prompt_tokens"] + u["completion_tokens"]


def get(addr, path, token=ADMIN_TOKEN):
    req = urllib.request.Request(f"http://{addr}{path}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()


def limit_row(addr, rule, key, unit):
    view = json.loads(get(addr, "/v1/limits"))
    for row in view["data"]:
        if row["rule"] == rule and row["key"] == key and row["unit"] == unit:
            return row
    raise AssertionError(f"no {rule}/{key}/{unit} in {view}")


def metric(addr, name):
    for line in get(addr, "/metrics").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def wait_for(cond, what, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def lake_rows(*lakes, where="true"):
    files = [str(f) for lake in lakes for f in pathlib.Path(lake).rglob("*.parquet")]
    if not files:
        return []
    con = duckdb.connect()
    return con.execute(
        f"SELECT input_tokens + output_tokens, cost_usd, outcome, status FROM read_parquet({files!r}) WHERE {where}"
    ).fetchall()


def burst(addrs, n, **kw):
    """`n` concurrent requests spread over the gateways."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(chat, addrs[i % len(addrs)], **kw) for i in range(n)]
        return [f.result() for f in futures]


TPM = 2000


def test_two_gateways_sharing_redis_never_admit_more_tokens_than_the_limit(rig):
    d, procs = rig
    redis = Redis(d / "redis")
    procs.append(redis)
    sim = simulator(d, "--latency-ms", "300")
    procs.append(sim)
    rules = f"""[[rate_limits]]
name = "tpm"
key = "consumer"
tokens_per_minute = {TPM}
on_limit = "reject"
"""
    gws = shared_gateways(d, procs, sim, rules, redis, "gw0", "gw1")
    results = burst([g.addr for g in gws], 200, max_tokens=16)
    admitted = [tokens_of(b) for s, _, b in results if s == 200]
    refused = [(h, b) for s, h, b in results if s == 429]
    assert len(admitted) + len(refused) == 200, [s for s, _, _ in results]
    assert refused and admitted
    assert sum(admitted) <= TPM, f"{len(admitted)} admitted used {sum(admitted)} tokens"
    for h, b in refused:
        assert json.loads(b)["error"]["code"] == "rate_limit_exceeded"
        assert h["x-ratelimit-limit-tokens"] == str(TPM) and h["x-ratelimit-remaining-tokens"] == "0"
        assert int(h["retry-after"]) >= 1 and h["x-ratelimit-reset-tokens"]
    for s, h, _ in results:
        if s == 200:
            assert h["x-ratelimit-limit-tokens"] == str(TPM) and "x-ratelimit-remaining-tokens" in h
    row = limit_row(gws[0].addr, "tpm", "python-app", "tokens")
    wait_for(lambda: limit_row(gws[1].addr, "tpm", "python-app", "tokens")["reserved"] == 0, "settlements")
    row = limit_row(gws[1].addr, "tpm", "python-app", "tokens")
    assert row["used"] == sum(admitted), "the shared counter equals what the admitted requests used"


def test_without_max_tokens_the_overshoot_is_the_estimate_error_in_flight(rig, artifacts):
    d, procs = rig
    redis = Redis(d / "redis")
    procs.append(redis)
    sim = simulator(d, "--latency-ms", "300")
    procs.append(sim)
    # A default output estimate (4) below what each answer uses (16): every
    # request in flight may overshoot by its error.
    rules = f"""[[rate_limits]]
name = "tpm"
model = "deepseek-r1"
key = "consumer"
tokens_per_minute = {TPM}
default_output_tokens = 4
on_limit = {{ fallback = "qwq-32b" }}

[[rate_limits]]
name = "qwq-tpm"
model = "qwq-32b"
key = "consumer"
tokens_per_minute = {TPM}
default_output_tokens = 4
"""
    gws = shared_gateways(d, procs, sim, rules, redis, "gw0", "gw1")
    results = burst([g.addr for g in gws], 200)
    served = {"deepseek-reasoner": [], "qwq-32b": []}
    for s, h, b in results:
        assert s in (200, 429), s
        if s == 200:
            served[h["x-tollgate-served-model"]].append(tokens_of(b))
    assert served["qwq-32b"], "the fallback served once R1 was limited"
    over = {m: max(0, sum(t) - TPM) for m, t in served.items()}
    per_request_error = 16 - 4
    for m, t in served.items():
        assert over[m] <= per_request_error * len(t), (m, over[m])
    (artifacts / "limits-overshoot.json").write_text(json.dumps(
        {"limit": TPM, "admitted_tokens": {m: sum(t) for m, t in served.items()},
         "requests": {m: len(t) for m, t in served.items()}, "overshoot_tokens": over,
         "estimate_error_per_request": per_request_error}))
    print("overshoot without max_tokens:", over)


def test_a_usd_budget_hit_by_100_concurrent_requests_ends_at_or_under_it(rig):
    d, procs = rig
    redis = Redis(d / "redis")
    procs.append(redis)
    sim = simulator(d, "--latency-ms", "200")
    procs.append(sim)
    budget = "0.0006"
    rules = f"""[[budgets]]
name = "search-daily"
team = "search"
usd = "{budget}"
period = "day"
timezone = "Asia/Shanghai"
on_exhausted = "block"
"""
    gws = shared_gateways(d, procs, sim, rules, redis, "gw0", "gw1")
    # Near exhaustion first, one at a time.
    for _ in range(8):
        assert chat(gws[0].addr, max_tokens=16)[0] == 200
    results = burst([g.addr for g in gws], 100, max_tokens=16)
    codes = [json.loads(b)["error"]["code"] for s, _, b in results if s == 429]
    assert codes and set(codes) == {"budget_exceeded"}
    assert all(s in (200, 429) for s, _, _ in results)
    wait_for(lambda: limit_row(gws[0].addr, "search-daily", "*", "usd")["reserved"] == "0", "settlements")
    used = float(limit_row(gws[0].addr, "search-daily", "*", "usd")["used"])
    assert used <= float(budget), used
    wait_for(lambda: len(lake_rows(*(g.lake for g in gws))) == 108, "the ledger", timeout=30)
    spent = sum(float(c) for _, c, _, _ in lake_rows(*(g.lake for g in gws)))
    assert abs(spent - used) < 1e-9, (spent, used)
    assert spent <= float(budget)


@pytest.mark.parametrize("shared", [False, True], ids=["in process", "redis flushed meanwhile"])
def test_a_gateway_killed_with_sigkill_comes_back_with_the_same_budget_spend(rig, shared):
    d, procs = rig
    redis = Redis(d / "redis") if shared else None
    if redis:
        procs.append(redis)
    sim = simulator(d)
    procs.append(sim)
    rules = """[[budgets]]
name = "search-monthly"
team = "search"
usd = "0.0003"
period = "month"
on_exhausted = "block"
"""
    gw = gateway(d, "gw", sim, rules, redis)
    procs.append(gw)
    if redis:
        wait_for(lambda: metric(gw.addr, "tollgate_limits_redis_up") == 1, "Redis in use")
    statuses = [chat(gw.addr, max_tokens=16)[0] for _ in range(8)]
    assert 429 in statuses and statuses[0] == 200, statuses
    wait_for(lambda: limit_row(gw.addr, "search-monthly", "*", "usd")["reserved"] == "0", "settlements")
    before = limit_row(gw.addr, "search-monthly", "*", "usd")
    time.sleep(0.5)  # the spool's group commit
    gw.p.send_signal(signal.SIGKILL)
    gw.p.wait()
    if redis:
        # Redis loses its data too: the ledger is the truth.
        subprocess.run(["redis-cli", "-p", str(redis.port), "FLUSHALL"], check=True, capture_output=True)
    again = Proc(["serve", "--config", str(gw.config)], d / "gw" / "gateway-2.log", ENV)
    procs.append(again)
    if redis:
        wait_for(lambda: metric(again.addr, "tollgate_limits_redis_up") == 1, "Redis in use")
    after = limit_row(again.addr, "search-monthly", "*", "usd")
    assert after["used"] == before["used"], (before, after)
    assert chat(again.addr, max_tokens=16)[0] == 429, "the spent budget still blocks"


def test_a_cancelled_stream_settles_to_what_was_generated(rig):
    d, procs = rig
    sim = simulator(d, "--tokens-per-s", "40", output=400)
    procs.append(sim)
    rules = """[[rate_limits]]
name = "all"
key = "global"
tokens_per_hour = 1000000
"""
    gw = gateway(d, "gw", sim, rules)
    procs.append(gw)
    body = json.dumps({"model": "deepseek-r1", "stream": True, "max_tokens": 400,
                       "messages": [{"role": "user", "content": "Write a long essay."}]})
    host, port = gw.addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
    s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
    got = b""
    while got.count(b"data: ") < 6:
        got += s.recv(4096)
    s.close()
    wait_for(lambda: limit_row(gw.addr, "all", "*", "tokens")["reserved"] == 0, "the settlement")
    used = limit_row(gw.addr, "all", "*", "tokens")["used"]
    wait_for(lambda: lake_rows(gw.lake), "the event", timeout=30)
    [(tokens, _, outcome, _)] = lake_rows(gw.lake)
    assert outcome == "client_cancelled"
    assert used == tokens, (used, tokens)
    assert tokens < 400, "charged what was generated, not the reservation"


def test_redis_killed_mid_traffic_costs_no_5xx_and_is_reconciled(rig):
    d, procs = rig
    redis = Redis(d / "redis", persist=True)
    procs.append(redis)
    sim = simulator(d, "--latency-ms", "20")
    procs.append(sim)
    rules = """[[rate_limits]]
name = "hourly"
key = "consumer"
tokens_per_hour = 100000000
"""
    gws = shared_gateways(d, procs, sim, rules, redis, "gw0", "gw1")
    results, stop = [], threading.Event()

    def traffic(addr):
        while not stop.is_set():
            results.append(chat(addr, max_tokens=16))

    threads = [threading.Thread(target=traffic, args=(g.addr,)) for g in gws for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    redis.kill()
    wait_for(lambda: all(metric(g.addr, "tollgate_limits_redis_up") == 0 for g in gws), "the outage seen")
    time.sleep(1.5)
    redis.start()
    wait_for(lambda: all(metric(g.addr, "tollgate_limits_redis_up") == 1 for g in gws), "Redis back", timeout=20)
    time.sleep(1)
    stop.set()
    for t in threads:
        t.join()
    statuses = [s for s, _, _ in results]
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    assert all(metric(g.addr, "tollgate_limits_local_admissions_total") > 0 for g in gws)
    for g in gws:
        wait_for(lambda g=g: metric(g.addr, "tollgate_limits_settlements_backlog") == 0, "the merge")
    time.sleep(0.5)
    row = limit_row(gws[0].addr, "hourly", "python-app", "tokens")
    assert row["used"] == sum(tokens_of(b) for _, _, b in results), ("the totals are reconciled", row, len(results))
    print("after the outage:", row, len(results))


def sql(gw, query, token=ADMIN_TOKEN):
    req = urllib.request.Request(f"http://{gw.query}/v1/sql", data=json.dumps({"query": query}).encode(),
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{query}: {e.code} {e.read()}") from None


def test_sql_shows_spend_against_budget_as_the_gateway_counts_it(rig):
    d, procs = rig
    sim = simulator(d)
    procs.append(sim)
    rules = """[[rate_limits]]
name = "r1-tokens"
model = "deepseek-r1"
key = "consumer"
tokens_per_minute = 90
on_limit = { fallback = "qwq-32b" }

[[budgets]]
name = "search-qwq"
team = "search"
model = "qwq-*"
usd = "1.00"
period = "month"
timezone = "Asia/Shanghai"
alert_at = [0.5, 1.0]
on_exhausted = { downgrade = "qwq-32b" }

[[budgets]]
name = "other-team"
team = "billing"
usd = "5"

[[budgets]]
name = "search-feature"
tag = "feature=sea*"
usd = "5"
on_exhausted = "alert_only"
"""
    gw = gateway(d, "gw", sim, rules, query=True)
    procs.append(gw)
    served = [chat(gw.addr, max_tokens=16, tags=f"feature={f}")[1]["x-tollgate-served-model"]
              for f in ["search", "chat"] * 3]
    assert "qwq-32b" in served and "deepseek-reasoner" in served, served
    wait_for(lambda: len(lake_rows(gw.lake)) == 6, "the ledger", timeout=30)
    rows = {r["name"]: r for r in sql(gw, "SELECT * FROM budgets")}
    qwq_cost = sum(float(c) for _, c, _, _ in lake_rows(gw.lake, where="served_model = 'qwq-32b'"))
    assert qwq_cost > 0
    assert abs(float(rows["search-qwq"]["spent_usd"]) - qwq_cost) < 1e-12, rows
    gateway_used = float(limit_row(gw.addr, "search-qwq", "*", "usd")["used"])
    assert abs(gateway_used - qwq_cost) < 1e-12, "the gateway's counter and the lake agree"
    assert rows["search-qwq"]["period"] == "month" and rows["search-qwq"]["timezone"] == "Asia/Shanghai"
    assert float(rows["other-team"]["spent_usd"]) == 0
    tagged = sum(float(c) for _, c, _, _ in lake_rows(gw.lake, where="tags['feature'] = 'search'"))
    assert abs(float(rows["search-feature"]["spent_usd"]) - tagged) < 1e-12 and tagged > 0
    limits = sql(gw, "SELECT name, unit, \"window\", \"limit\", on_limit, fallback FROM rate_limits")
    assert limits == [{"name": "r1-tokens", "unit": "tokens", "window": "minute", "limit": limits[0]["limit"],
                       "on_limit": "fallback", "fallback": "qwq-32b"}]
    assert float(limits[0]["limit"]) == 90
    own = sql(gw, "SELECT name FROM budgets", token=KEY)
    assert sorted(r["name"] for r in own) == ["search-feature", "search-qwq"], "its team's and everyone's"
    import psycopg
    host, port = gw.pg.rsplit(":", 1)
    with psycopg.connect(host=host, port=int(port), user="admin", password=ADMIN_TOKEN, dbname="tollgate") as conn:
        got = conn.execute("SELECT name, spent_usd, usd FROM budgets ORDER BY name").fetchall()
    assert [g[0] for g in got] == ["other-team", "search-feature", "search-qwq"]


def test_reservations_of_a_gateway_killed_mid_request_are_released_by_the_survivors(rig):
    d, procs = rig
    redis = Redis(d / "redis")
    procs.append(redis)
    sim = simulator(d, "--tokens-per-s", "5", output=400)
    procs.append(sim)
    rules = """[[budgets]]
name = "search-daily"
team = "search"
usd = "10"
period = "day"
"""
    doomed, survivor = shared_gateways(d, procs, sim, rules, redis, "doomed", "survivor")
    host, port = doomed.addr.rsplit(":", 1)
    body = json.dumps({"model": "deepseek-r1", "stream": True, "max_tokens": 400,
                       "messages": [{"role": "user", "content": "Write a long essay."}]})
    streams = []
    for _ in range(3):
        s = socket.create_connection((host, int(port)))
        s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
        streams.append(s)
    for s in streams:
        s.recv(4096)  # the head: the reservations are made
    held = limit_row(survivor.addr, "search-daily", "*", "usd")["reserved"]
    assert float(held) > 0, held
    doomed.p.send_signal(signal.SIGKILL)
    doomed.p.wait()
    for s in streams:
        s.close()
    wait_for(lambda: limit_row(survivor.addr, "search-daily", "*", "usd")["reserved"] == "0",
             "the dead gateway's reservations released", timeout=60)
