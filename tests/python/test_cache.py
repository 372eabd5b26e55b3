"""The response cache and the content guard with real processes: a real
Redis (Debian's redis-server) shared by two gateways, killed, slowed and
filled mid-traffic; the official `openai` SDK reading hits and blocks,
streamed and whole; and the ledger's hits, savings and costs read back from
the Parquet lake with DuckDB."""

import json
import pathlib
import socket
import time
import urllib.error
import urllib.request

import duckdb
import openai
import pytest

from conftest import KEY, UPSTREAM_KEY, Proc, sha, upstream
from test_limits import BILLING_KEY, ENV, Redis, metric, simulator, wait_for

QUESTION = "What did the search team spend on tokens?"


def gateway(directory, name, sim, redis=None, cache='{ mode = "exact", ttl_s = 600 }', extra=""):
    """A `tollgate serve` with a cached qwq-32b route on `sim`, the
    python-app and billing-app consumers, its own lake, and `extra`."""
    d = directory / name
    d.mkdir(parents=True, exist_ok=True)
    shared = f'[redis]\nurl = "{redis.url}"\ntimeout_ms = 200\n\n' if redis else ""
    config = f"""
[gateway]
listen = "127.0.0.1:0"
instance = "{name}"

[pipeline]
spool_dir = "{d / "spool"}"
lake = "{d / "lake"}"
flush_ms = 100

[cache]
lookup_timeout_ms = 50

{shared}{upstream("sim", sim.addr)}
[[routes]]
model = "qwq-32b"
targets = [{{ upstream = "sim", model = "qwq-32b" }}]
cache = {cache}

[[consumers]]
name = "python-app"
team = "search"
api_keys = ["{sha(KEY)}"]

[[consumers]]
name = "billing-app"
team = "billing"
api_keys = ["{sha(BILLING_KEY)}"]

{extra}
"""
    path = d / "tollgate.toml"
    path.write_text(config)
    gw = Proc(["serve", "--config", str(path)], d / "gateway.log", ENV)
    gw.lake = d / "lake"
    return gw


def ask(addr, question=QUESTION, key=KEY, stream=False, control=None, **extra):
    body = {"model": "qwq-32b", "messages": [{"role": "user", "content": question}], **extra}
    if stream:
        body["stream"] = True
    req = urllib.request.Request(f"http://{addr}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    if control:
        req.add_header("Cache-Control", control)
    started = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            out = r.status, r.headers.get("x-tollgate-cache"), r.read()
    except urllib.error.HTTPError as e:
        out = e.code, e.headers.get("x-tollgate-cache"), e.read()
    return (*out, time.monotonic() - started)


def client(gw, key=KEY):
    return openai.OpenAI(base_url=f"http://{gw.addr}/v1", api_key=key, max_retries=0, timeout=30)


def lake(gw, n, columns="cache, cache_kind, cost_usd, cost_saved_usd, input_tokens, output_tokens",
         where="endpoint = 'chat/completions'"):
    """The gateway's `n` events matching `where`, oldest first, once all
    are in the lake."""
    def rows():
        files = [str(f) for f in pathlib.Path(gw.lake).rglob("*.parquet")]
        if not files:
            return []
        return duckdb.connect().execute(
            f"SELECT {columns} FROM read_parquet({files!r}) WHERE {where} ORDER BY ts_start").fetchall()
    wait_for(lambda: len(rows()) >= n, f"{n} events in the lake", timeout=30)
    got = rows()
    assert len(got) == n, got
    return got


def sim_up(rig):
    d, procs = rig
    sim = simulator(d, output=12)
    procs.append(sim)
    return d, procs, sim


def with_redis(rig, **kw):
    """A simulator, a Redis and one gateway using both; all stopped with the test."""
    d, procs, sim = sim_up(rig)
    redis = Redis(d / "redis")
    gw = gateway(d, "gw", sim, redis, **kw)
    procs += [redis, gw]
    return redis, gw


def test_two_gateways_share_exact_entries_through_redis_but_not_across_consumers(rig):
    d, procs, sim = sim_up(rig)
    redis = Redis(d / "redis")
    procs.append(redis)
    gw0, gw1 = gateway(d, "gw0", sim, redis), gateway(d, "gw1", sim, redis)
    procs += [gw0, gw1]
    wait_for(lambda: ask(gw0.addr)[1] == "miss" and ask(gw1.addr)[1] == "hit", "Redis in use")
    status, cache, body, _ = ask(gw1.addr, key=BILLING_KEY)
    assert (status, cache) == (200, "miss"), "another consumer never gets python-app's entry"
    # Stores are asynchronous: billing-app's entry is in Redis shortly.
    wait_for(lambda: ask(gw0.addr, key=BILLING_KEY)[1] == "hit", "billing-app's entry shared")


def test_the_sdk_reads_a_streamed_hit_equal_to_the_original_stream(rig):
    redis, gw = with_redis(rig)
    c = client(gw)

    def streamed():
        raw = c.chat.completions.with_raw_response.create(
            model="qwq-32b", messages=[{"role": "user", "content": QUESTION}], stream=True,
            stream_options={"include_usage": True})
        text, usage = "", None
        for chunk in raw.parse():
            for ch in chunk.choices:
                text += ch.delta.content or ""
            if chunk.usage:
                usage = chunk.usage.model_dump()
        return raw.headers.get("x-tollgate-cache"), text, usage

    first = streamed()
    assert first[0] == "miss" and first[1] and first[2]["completion_tokens"] == 12
    wait_for(lambda: streamed()[0] == "hit", "the stream stored")
    again = streamed()
    assert again == ("hit", first[1], first[2])
    whole = c.chat.completions.with_raw_response.create(
        model="qwq-32b", messages=[{"role": "user", "content": QUESTION}])
    assert whole.headers.get("x-tollgate-cache") == "hit"
    assert whole.parse().choices[0].message.content == first[1]


def test_redis_killed_mid_traffic_bypasses_without_an_error_and_comes_back(rig):
    redis, gw = with_redis(rig)
    wait_for(lambda: ask(gw.addr)[1] == "hit", "Redis in use")
    seen = []
    for i in range(30):
        if i == 10:
            redis.kill()
        status, cache, _, took = ask(gw.addr)
        seen.append((status, cache))
        assert took < 5, f"request {i} stalled {took:.1f} s"
    assert all(s == 200 for s, _ in seen), seen
    assert all(c == "hit" for _, c in seen[:10]), seen
    assert all(c == "bypass" for _, c in seen[12:]), seen
    errors = metric(gw.addr, 'tollgate_cache_lookups_total{result="error",kind="exact"}')
    assert errors and errors >= 18
    redis.start()
    wait_for(lambda: ask(gw.addr)[1] == "hit", "hits again once Redis is back", timeout=30)


def test_a_slow_redis_is_bypassed_within_the_lookup_timeout(rig):
    redis, gw = with_redis(rig)
    wait_for(lambda: ask(gw.addr)[1] == "hit", "Redis in use")
    # Redis holds every client's commands for 3 s: as slow as it gets.
    send(redis, b"CLIENT PAUSE 3000 ALL\r\n")
    status, cache, _, took = ask(gw.addr)
    assert (status, cache) == (200, "bypass")
    assert took < 2, f"waited {took:.2f} s on a paused Redis"


def send(redis, command):
    with socket.create_connection(("127.0.0.1", redis.port), timeout=10) as s:
        s.sendall(command)
        s.recv(64)


def test_a_full_redis_refuses_stores_and_every_request_still_succeeds(rig):
    redis, gw = with_redis(rig)
    wait_for(lambda: ask(gw.addr, question="warm up")[1] == "hit", "Redis in use")
    send(redis, b"CONFIG SET maxmemory-policy noeviction\r\n")
    send(redis, b"CONFIG SET maxmemory 1\r\n")
    for i in range(5):
        status, cache, _, _ = ask(gw.addr, question=f"question {i}")
        assert (status, cache) == (200, "miss")
    wait_for(lambda: (metric(gw.addr, 'tollgate_cache_stores_total{result="failed"}') or 0) >= 5,
             "the refused stores counted")
    assert ask(gw.addr, question="question 0")[1] == "miss", "nothing was stored"


def test_hits_savings_and_costs_in_the_lake_equal_what_the_clients_saw(rig):
    d, procs, sim = sim_up(rig)
    embed = f'{{ mode = "semantic", embeddings = {{ upstream = "sim", model = "text-embedding-v3" }}, threshold = 0.6 }}'
    gw = gateway(d, "gw", sim, cache=embed)
    procs.append(gw)
    questions = [QUESTION, QUESTION, "what did the search team spend on tokens", "Which model is cheapest?",
                 "Which model is cheapest?", QUESTION + " Last week?"]
    caches = [ask(gw.addr, question=q)[1] for q in questions]
    assert caches == ["miss", "hit", "hit", "miss", "hit", "hit"], caches
    rows = lake(gw, len(questions))
    assert [r[0] for r in rows] == caches
    misses = {q: r for q, r in zip(questions, rows) if r[0] == "miss"}
    assert all(r[2] > 0 for r in misses.values())
    for q, r in zip(questions, rows):
        if r[0] != "hit":
            continue
        original = misses[QUESTION] if "search" in q else misses["Which model is cheapest?"]
        assert r[2] == 0, "a hit costs nothing"
        assert r[3] == original[2], "and saves what the original cost"
        assert (r[4], r[5]) == (original[4], original[5]), "with the original's tokens"
    kinds = [r[1] for r in rows if r[0] == "hit"]
    assert kinds == ["exact", "semantic", "exact", "semantic"]
    # The totals finance reads: spend is the misses' cost, savings the
    # hits' originals.
    assert sum(r[2] for r in rows) == sum(r[2] for r in misses.values())
    assert sum(r[3] for r in rows if r[0] == "hit") == 3 * misses[QUESTION][2] + misses["Which model is cheapest?"][2]
    # Each embeddings call of a lookup is an event of its own, the
    # consumer's, tagged as the cache's.
    calls = lake(gw, 4, columns="consumer, tags['tollgate.purpose'], input_tokens", where="endpoint = 'embeddings'")
    assert all(c[0] == "python-app" and c[1] == "semantic_cache" and c[2] > 0 for c in calls), calls
    for kind in ("exact", "semantic"):
        assert metric(gw.addr, f'tollgate_cache_lookups_total{{result="hit",kind="{kind}"}}') == 2


GUARD = """
[[guard]]
name = "no-pii-out"
direction = "input"
detect = ["email", "bank_card", "secret"]

[[guard]]
name = "no-secrets-back"
direction = "output"
detect = ["secret"]
"""


def test_the_sdk_sees_content_blocked_on_input_and_mid_stream(rig):
    d, procs, sim = sim_up(rig)
    gw = gateway(d, "gw", sim, cache='{ mode = "off" }', extra=GUARD)
    procs.append(gw)
    c = client(gw)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="qwq-32b", messages=[{"role": "user", "content": "card 4111-1111-1111-1111"}])
    assert e.value.code == "content_blocked"
    with pytest.raises(openai.APIError) as e:
        for _ in c.chat.completions.create(
                model="qwq-32b", stream=True,
                messages=[{"role": "user", "content": "say: here is sk-live|abcdefghijkl|mnopqrstuvwxyz0123"}]):
            pass
    assert "content guard" in str(e.value)
    rows = lake(gw, 2, columns="outcome, limit_key, cost_usd")
    assert rows[0] == ("blocked", "no-pii-out:input", 0)
    assert rows[1][:2] == ("blocked", "no-secrets-back:output") and rows[1][2] > 0


def test_a_flushed_redis_leaves_no_stale_semantic_rows_in_the_way(rig):
    semantic = '{ mode = "semantic", embeddings = { upstream = "sim", model = "e" }, threshold = 0.9 }'
    redis, gw = with_redis(rig, cache=semantic)
    wait_for(lambda: ask(gw.addr, question="warm up")[1] == "hit", "Redis in use")
    assert ask(gw.addr, question="Why is the sky blue")[1] == "miss"
    send(redis, b"FLUSHALL\r\n")
    stored = lambda: metric(gw.addr, 'tollgate_cache_stores_total{result="stored"}') or 0
    before = stored()
    assert ask(gw.addr, question="why is the sky blue?")[1] == "miss"
    # Stores are asynchronous: wait for this one, then ask alike.
    wait_for(lambda: stored() > before, "the new entry stored")
    status, cache, _, _ = ask(gw.addr, question="why is the SKY blue")
    assert (status, cache) == (200, "hit"), "the new entry is found past the stale row"
