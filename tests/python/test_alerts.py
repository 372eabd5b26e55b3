"""Alerts end to end: real gateways with their query services evaluating the
ledger, a real webhook receiver on loopback, and (for one variant) a real
Redis. Budget thresholds crossed by concurrent traffic fire once each, even
with two query services on one lake, and a SIGKILL between two thresholds
neither repeats the first nor loses the second; a webhook that fails is
retried until it recovers, and its signature verifies; dead letters open a
pipeline alert that is resolved when they are gone."""

import hashlib
import hmac
import http.server
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request

import duckdb
import pytest

from conftest import ADMIN_TOKEN, KEY, Proc
from test_limits import BILLING_KEY, ENV, Redis, burst, chat, gateway, lake_rows, simulator, wait_for

# A sweep canary: it must appear in no log, outbox file or alert record.
SECRET = "tg-canary-webhook-secret-7f6e5d4c"
os.environ["TOLLGATE_WEBHOOK_SECRET"] = SECRET


class Receiver:
    """A webhook endpoint on loopback: keeps every delivery (time, headers,
    body); answers 500 to the first `fail_first` ones."""

    def __init__(self, fail_first=0):
        self.got = []
        self.failures_left = fail_first
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with outer.lock:
                    fail = outer.failures_left > 0
                    if fail:
                        outer.failures_left -= 1
                    else:
                        outer.got.append((time.time(), {k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(500 if fail else 204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self, kind=None):
        with self.lock:
            out = [(t, h, json.loads(b)) for t, h, b in self.got]
        return [x for x in out if kind is None or x[2].get("kind") == kind]

    def stop(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def request_cost(artifacts):
    """What one test request costs in USD, from the ledger of a gateway
    without rules (the simulator answers the same to every request)."""
    d = artifacts / "alerts" / "calibration"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    sim = simulator(d)
    gw = gateway(d, "cal", sim, "")
    try:
        assert chat(gw.addr)[0] == 200
        wait_for(lambda: list((d / "cal" / "lake").rglob("*.parquet")), "the lake", timeout=20)
        files = [str(f) for f in (d / "cal" / "lake").rglob("*.parquet")]
        cost = duckdb.connect().execute(f"SELECT max(cost_usd) FROM read_parquet({files!r})").fetchone()[0]
    finally:
        gw.stop()
        sim.stop()
    assert cost > 0
    return cost


def sql(addr, query, token=ADMIN_TOKEN):
    req = urllib.request.Request(f"http://{addr}/v1/sql", data=json.dumps({"query": query}).encode(),
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def listed(addr, token=ADMIN_TOKEN, query=""):
    req = urllib.request.Request(f"http://{addr}/v1/alerts{query}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())["data"]


def query_metric(addr, name):
    req = urllib.request.Request(f"http://{addr}/metrics")
    with urllib.request.urlopen(req, timeout=10) as r:
        total = 0.0
        seen = False
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.split()[-1])
                seen = True
        return total if seen else None


def budget_rules(usd, alert_at, hooks, extra=""):
    hooks_toml = "".join(
        f'[[alerts.webhooks]]\nurl = "{url}"\nformat = "{fmt}"\n{secret}\n'
        for url, fmt, secret in hooks
    )
    return f"""[[budgets]]
name = "search-daily"
team = "search"
usd = "{usd}"
period = "day"
alert_at = {json.dumps(alert_at)}
on_exhausted = "alert_only"

[alerts]
evaluate_ms = 500
{extra}
{hooks_toml}"""


def with_outbox(rules, d, name):
    return rules.replace("[alerts]\n", f'[alerts]\noutbox_dir = "{d / name / "outbox"}"\n', 1)


@pytest.mark.parametrize("claims", ["lake", "redis"])
def test_thresholds_crossed_by_concurrent_traffic_fire_once_each_with_two_query_services(rig, request_cost, claims):
    d, procs = rig
    redis = None
    if claims == "redis":
        redis = Redis(d / "redis")
        procs.append(redis)
    hook = Receiver()
    sim = simulator(d, "--latency-ms", "100")
    procs.append(sim)
    usd = f"{request_cost * 10:.10f}"
    rules = budget_rules(usd, [0.3, 0.6, 0.9], [(hook.url, "json", "")])
    # Two processes, each a gateway and a query service, on one lake.
    lake = d / "lake"
    gws = [gateway(d, name, sim, with_outbox(rules, d, name), redis=redis, query=True, lake=lake)
           for name in ("gw0", "gw1")]
    procs.extend(gws)
    results = burst([g.addr for g in gws], 10)
    assert [s for s, _, _ in results] == [200] * 10
    done = time.time()
    wait_for(lambda: len(hook.alerts("budget")) >= 3, "three budget alerts", timeout=20)
    time.sleep(3)  # several more evaluations by both services
    budget = hook.alerts("budget")
    assert sorted(a["threshold"] for _, _, a in budget) == [0.3, 0.6, 0.9], [a for _, _, a in budget]
    assert len({a["id"] for _, _, a in budget}) == 3
    for t, headers, a in budget:
        assert t - done < 10, "within 10 s of the spend crossing it"
        assert headers["x-tollgate-alert-id"] == a["id"]
        assert a["name"] == "search-daily" and a["status"] == "firing"
        assert a["budget_usd"] and a["spent_usd"] and a["period_start"]
    fired = sum(query_metric(g.query, "tollgate_alerts_fired_total") or 0 for g in gws)
    assert fired == len(hook.alerts()), "each alert was sent by exactly one service"
    for gw in gws:
        ids = {a["id"] for a in listed(gw.query, query="?kind=budget")}
        assert ids == {a["id"] for _, _, a in budget}
    rows = sql(gws[0].query, "SELECT threshold, status FROM alerts WHERE kind = 'budget' ORDER BY threshold")
    assert [r["threshold"] for r in rows] == [0.3, 0.6, 0.9]
    hook.stop()


def test_a_sigkill_between_two_thresholds_neither_repeats_the_first_nor_loses_the_second(rig, request_cost):
    d, procs = rig
    hook = Receiver()
    sim = simulator(d)
    procs.append(sim)
    usd = f"{request_cost * 10:.10f}"
    rules = with_outbox(budget_rules(usd, [0.3, 0.8], [(hook.url, "json", "")]), d, "gw")
    gw = gateway(d, "gw", sim, rules, query=True)
    procs.append(gw)
    burst([gw.addr], 4)
    wait_for(lambda: len(hook.alerts("budget")) == 1, "the 30% alert", timeout=20)
    gw.stop()  # SIGKILL
    gw = Proc(["serve", "--config", str(gw.config)], d / "gw" / "gateway-2.log", ENV)
    procs.append(gw)
    time.sleep(3)
    assert len(hook.alerts("budget")) == 1, "not repeated after the restart"
    burst([gw.addr], 5)
    wait_for(lambda: len(hook.alerts("budget")) == 2, "the 80% alert", timeout=20)
    time.sleep(2)
    thresholds = [a["threshold"] for _, _, a in hook.alerts("budget")]
    assert thresholds == [0.3, 0.8]
    hook.stop()


def test_a_failing_webhook_is_retried_until_it_recovers_and_its_signature_verifies(rig, request_cost):
    d, procs = rig
    flaky = Receiver(fail_first=3)
    slack = Receiver()
    sim = simulator(d)
    procs.append(sim)
    usd = f"{request_cost * 4:.10f}"
    hooks = [(flaky.url, "json", 'secret = "${TOLLGATE_WEBHOOK_SECRET}"'), (slack.url, "slack", "")]
    rules = with_outbox(budget_rules(usd, [0.5], hooks), d, "gw")
    gw = gateway(d, "gw", sim, rules, query=True)
    procs.append(gw)
    burst([gw.addr], 3)
    wait_for(lambda: slack.alerts(), "the slack delivery", timeout=20)
    wait_for(lambda: (query_metric(gw.query, "tollgate_alerts_deliveries_failing") or 0) >= 1, "a failing delivery")
    assert query_metric(gw.query, "tollgate_alerts_deliveries_pending") >= 1, "kept while it fails"
    wait_for(lambda: flaky.alerts("budget"), "the retried delivery", timeout=30)
    assert query_metric(gw.query, 'tollgate_alerts_deliveries_total{outcome="failed"}') >= 3
    wait_for(lambda: query_metric(gw.query, "tollgate_alerts_deliveries_pending") == 0, "nothing pending")
    for _, headers, raw in flaky.got:
        ts = headers["x-tollgate-timestamp"]
        want = hmac.new(SECRET.encode(), f"{ts}.".encode() + raw, hashlib.sha256).hexdigest()
        assert headers["x-tollgate-signature"] == f"v1={want}"
        assert abs(int(ts) - time.time()) < 60
    _, _, alert = flaky.alerts("budget")[0]
    assert alert["threshold"] == 0.5 and alert["kind"] == "budget"
    for _, headers, raw in slack.got:
        body = json.loads(raw)
        assert "search-daily" in body["text"] and body["blocks"][0]["type"] == "header"
        assert "x-tollgate-signature" not in headers, "no secret, no signature"
    # One delivery per alert and webhook, however many attempts it took.
    assert len(flaky.got) == len(slack.got)
    assert len({h["x-tollgate-alert-id"] for _, h, _ in flaky.got}) == len(flaky.got)
    flaky.stop()
    slack.stop()


def test_a_consumer_sees_its_budgets_alerts_and_never_the_pipelines(rig, request_cost):
    d, procs = rig
    sim = simulator(d)
    procs.append(sim)
    usd = f"{request_cost * 4:.10f}"
    rules = with_outbox(budget_rules(usd, [0.5], []), d, "gw")
    # Events over 2,500 bytes go to dead letters: an ordinary one is well
    # under, one with sixteen long tags is over.
    gw = gateway(d, "gw", sim, rules, query=True, pipeline="max_event_bytes = 2500")
    procs.append(gw)
    tags = ",".join(f"k{i:02d}{'x' * 60}={'v' * 64}" for i in range(16))
    assert chat(gw.addr, tags=tags)[0] == 200
    wait_for(lambda: list((d / "gw" / "lake" / "dead_letters").rglob("*.json")), "a dead letter", timeout=20)
    burst([gw.addr], 3)
    wait_for(lambda: any(a["kind"] == "budget" for a in listed(gw.query)), "the budget alert", timeout=20)
    wait_for(lambda: any(a["kind"] == "pipeline" for a in listed(gw.query)), "the dead-letter alert", timeout=20)
    mine = listed(gw.query, token=KEY)
    assert {a["kind"] for a in mine} <= {"budget", "forecast"} and "budget" in {a["kind"] for a in mine}, mine
    assert sorted(r["kind"] for r in sql(gw.query, "SELECT kind FROM alerts", token=KEY)) == sorted(
        a["kind"] for a in mine)
    assert listed(gw.query, token=BILLING_KEY) == [], "another team's budget"
    # Handled (removed from the lake): a resolved notice, once.
    for f in (d / "gw" / "lake" / "dead_letters").rglob("*.json"):
        f.unlink()
    wait_for(lambda: any(a["status"] == "resolved" for a in listed(gw.query, query="?kind=pipeline")),
             "the resolved notice", timeout=20)
    time.sleep(1.5)
    pipeline = listed(gw.query, query="?kind=pipeline")
    assert sorted(a["status"] for a in pipeline) == ["firing", "resolved"], pipeline
    for bad in ["?kind=nope", "?limit=0", "?since=yesterday", "?colour=red"]:
        try:
            listed(gw.query, query=bad)
            raise AssertionError(f"{bad} accepted")
        except urllib.error.HTTPError as e:
            assert e.code == 400 and json.loads(e.read())["error"]["type"] == "invalid_request_error"



def test_a_lake_that_refuses_writes_raises_the_lag_alert_and_loses_nothing(rig, request_cost):
    d, procs = rig
    sim = simulator(d)
    procs.append(sim)
    rules = with_outbox(budget_rules(f"{request_cost * 1000:.10f}", [0.9], [], extra="ingest_lag_s = 1"), d, "gw")
    gw = gateway(d, "gw", sim, rules, query=True)
    procs.append(gw)
    assert chat(gw.addr)[0] == 200
    usage = d / "gw" / "lake" / "usage"
    wait_for(lambda: list(usage.rglob("*.parquet")), "the first row", timeout=20)
    # The lake's usage directory replaced by a file: every publish fails.
    shutil.move(usage, d / "gw" / "usage.bak")
    usage.write_text("not a directory")
    for _ in range(3):
        assert chat(gw.addr)[0] == 200
    wait_for(lambda: any(a["kind"] == "pipeline" and a["name"].startswith("ingest_lag:") and a["status"] == "firing"
                         for a in listed(gw.query)), "the ingest lag alert", timeout=30)
    assert (query_metric(gw.addr, "tollgate_ingest_publish_failures_total") or 0) >= 1
    # Writable again: the spooled events arrive, the alert resolves, no restart.
    usage.unlink()
    shutil.move(d / "gw" / "usage.bak", usage)
    wait_for(lambda: len(lake_rows(d / "gw" / "lake")) == 4, "the four rows", timeout=30)
    wait_for(lambda: any(a["name"].startswith("ingest_lag:") and a["status"] == "resolved"
                         for a in listed(gw.query)), "the resolved notice", timeout=30)


def test_a_redis_that_lost_its_data_sends_nothing_twice(rig, request_cost):
    d, procs = rig
    redis = Redis(d / "redis")
    procs.append(redis)
    hook = Receiver()
    sim = simulator(d)
    procs.append(sim)
    rules = with_outbox(budget_rules(f"{request_cost * 10:.10f}", [0.3], [(hook.url, "json", "")]), d, "gw")
    gw = gateway(d, "gw", sim, rules, redis=redis, query=True)
    procs.append(gw)
    burst([gw.addr], 4)
    wait_for(lambda: len(hook.alerts("budget")) == 1, "the 30% alert", timeout=20)
    redis.kill()
    redis.start()  # empty: no persistence
    gw.stop()
    gw = Proc(["serve", "--config", str(gw.config)], d / "gw" / "gateway-2.log", ENV)
    procs.append(gw)
    time.sleep(4)
    assert len(hook.alerts("budget")) == 1, "the lake's claim still holds"
    assert len(listed(gw.query, query="?kind=budget")) == 1
    hook.stop()


def test_a_hanging_webhook_delays_no_other(rig, request_cost):
    d, procs = rig
    import socket
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(16)  # accepts, never answers
    ok = Receiver()
    sim = simulator(d)
    procs.append(sim)
    hooks = [(f"http://127.0.0.1:{hang.getsockname()[1]}/hook", "json", "timeout_ms = 60000"), (ok.url, "json", "")]
    rules = with_outbox(budget_rules(f"{request_cost * 10:.10f}", [0.2, 0.5], hooks), d, "gw")
    gw = gateway(d, "gw", sim, rules, query=True)
    procs.append(gw)
    burst([gw.addr], 3)
    wait_for(lambda: len(ok.alerts("budget")) == 1, "the 20% alert", timeout=20)
    burst([gw.addr], 4)
    wait_for(lambda: len(ok.alerts("budget")) == 2, "the 50% alert, while the other webhook hangs", timeout=20)
    hang.close()
    ok.stop()
