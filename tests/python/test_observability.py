"""Observability against real receivers: a real Prometheus scrapes the gateway
during mixed traffic and PromQL agrees with the lake; a real OTLP receiver
(decoding the protobuf) gets one server span per request and one client span
per attempt in the GenAI conventions; a collector that is down or never
answers costs dropped telemetry, counted, never a failed request."""

import json
import pathlib
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import uuid
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import duckdb
import pytest

from conftest import KEY, LIMITED_KEY, UPSTREAM_KEY, Proc, free_port, routes_and_consumers, simulators, upstream
from otlp_receiver import Receiver, SilentServer

ROOT = pathlib.Path(__file__).resolve().parents[2]
RULES = ROOT / "dashboards" / "prometheus" / "alerts.yml"
# Export promptly so the test need not wait a minute for a batch.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_METRIC_EXPORT_INTERVAL": "500"}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
# A glob route (bounded to its pattern on /metrics) and one to the recorder.
EXTRA_ROUTES = """[[routes]]
model = "qwq-*"
targets = [{ upstream = "qwq", model = "qwq-32b" }]

[[routes]]
model = "recorded"
targets = [{ upstream = "rec" }]

"""
PARENT_ID = "00f067aa0ba902b7"


class Recorder:
    """An OpenAI-compatible upstream that keeps the headers it was sent."""

    def __init__(self):
        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                seen.append({k.lower(): v for k, v in self.headers.items()})
                out = json.dumps({
                    "id": "chatcmpl-recorded-1", "object": "chat.completion", "created": 0,
                    "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
                }).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.addr = f"127.0.0.1:{self.server.server_address[1]}"

    def stop(self):
        self.server.shutdown()


class Rig:
    """Simulators, a recording upstream and one gateway with `telemetry`."""

    def __init__(self, artifacts, name, telemetry="", env=None):
        self.dir = artifacts / name
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.procs = list(simulators(self.dir))
        self.recorder = Recorder()
        r1, qwq, down = self.procs
        self.lake = self.dir / "lake"

        config = f"""
[gateway]
listen = "127.0.0.1:0"

[pipeline]
spool_dir = "{self.dir / "spool"}"
lake = "{self.lake}"
flush_ms = 100

[telemetry]
{telemetry}

{upstream("r1", r1.addr)}{upstream("qwq", qwq.addr)}{upstream("down", down.addr)}{upstream("rec", self.recorder.addr)}
{routes_and_consumers(EXTRA_ROUTES)}"""
        path = self.dir / "tollgate.toml"
        path.write_text(config)
        self.gw = Proc(["serve", "--config", str(path)], self.dir / "gateway.log",
                       {"UPSTREAM_KEY": UPSTREAM_KEY, **FAST_EXPORT, **(env or {})})
        self.url = f"http://{self.gw.addr}"

    def chat(self, key, model, stream=False, headers=None, content="How many tokens did search use?"):
        body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": content}]}
        h = {"authorization": f"Bearer {key}", "content-type": "application/json", **(headers or {})}
        req = urllib.request.Request(f"{self.url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers=h, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def mixed(self):
        """Streams and not, fallbacks, refusals and errors, two consumers; the statuses."""
        plan = ([(KEY, "deepseek-r1", s) for s in (False, True, False, True)]
                + [(KEY, "flaky-r1", s) for s in (False, True)]
                + [(LIMITED_KEY, m, s) for m in ("qwq-32b", "qwq-mini") for s in (False, True)]
                + [(LIMITED_KEY, "deepseek-r1", False),   # 403: not its model
                   ("tg-not-a-key", "deepseek-r1", False),  # 401
                   (KEY, "no-such-model", False)])           # 404
        return [self.chat(k, m, s)[0] for k, m, s in plan]

    def metrics_text(self, accept=None):
        req = urllib.request.Request(f"{self.url}/metrics", headers={"accept": accept} if accept else {})
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read().decode()

    def metric(self, name):
        for line in self.metrics_text().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not on /metrics")

    def events(self, n, timeout=30):
        """The lake's rows once all `n` are there."""
        deadline = time.time() + timeout
        glob = f"{self.lake}/usage/**/*.parquet"
        while True:
            try:
                # A connection per read: a failed read (no file yet) aborts
                # its connection's transaction.
                with duckdb.connect() as con:
                    rel = con.sql(f"SELECT * FROM read_parquet('{glob}', hive_partitioning = true)")
                    rows = [dict(zip(rel.columns, r)) for r in rel.fetchall()]
                if len(rows) >= n:
                    assert len(rows) == n, rows
                    for r in rows:
                        r["event_id"] = str(uuid.UUID(bytes=bytes(r["event_id"])))
                    return rows
            except duckdb.Error:
                pass
            assert time.time() < deadline, f"the lake has not got {n} rows"
            time.sleep(0.2)

    def stop(self):
        for p in [self.gw, *self.procs]:
            p.stop()
        self.recorder.stop()


class Prometheus:
    """Debian's prometheus, scraping the gateway every second."""

    def __init__(self, workdir, target):
        self.port = free_port()
        shutil.copy(RULES, workdir / "alerts.yml")
        (workdir / "prometheus.yml").write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: [alerts.yml]
scrape_configs:
  - job_name: tollgate
    static_configs: [{{targets: ["{target}"]}}]
""")
        self.p = subprocess.Popen(
            ["prometheus", f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=open(workdir / "prometheus.log", "wb"))
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2)
                return
            except OSError:
                assert self.p.poll() is None and time.time() < deadline, (workdir / "prometheus.log").read_text()
                time.sleep(0.2)

    def api(self, path, **params):
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql):
        """An instant vector as {labels tuple: value}."""
        return {tuple(sorted(s["metric"].items())): float(s["value"][1])
                for s in self.api("query", query=promql)["result"]}

    def stop(self):
        self.p.terminate()
        self.p.wait()


@pytest.fixture(scope="module")
def rig(artifacts):
    dumps = artifacts / "otlp-http"
    shutil.rmtree(dumps, ignore_errors=True)
    with Receiver(dump_dir=dumps) as rx:
        r = Rig(artifacts, "observed",
                f'otlp_endpoint = "{rx.http_endpoint}"\nservice_name = "tollgate-test"')
        r.rx = rx
        yield r
        r.stop()


def by(rows, *keys):
    out = {}
    for row in rows:
        k = tuple(row[x] if isinstance(row[x], str) else "-" for x in keys)
        out[k] = out.get(k, 0) + 1
    return out


def test_prometheus_scraping_mixed_traffic_agrees_with_the_lake(rig, tmp_path):
    prom = Prometheus(tmp_path, rig.gw.addr)
    try:
        statuses = rig.mixed()
        assert sorted(set(statuses)) == [200, 401, 403, 404], statuses
        rows = rig.events(len(statuses))
        want_requests = {}
        for (consumer, outcome), n in by(rows, "consumer", "outcome").items():
            want_requests[(("consumer", consumer), ("outcome", outcome))] = n
        deadline = time.time() + 30
        while prom.query("sum by (consumer, outcome) (tollgate_requests_total)") != want_requests:
            assert time.time() < deadline, (prom.query("sum by (consumer, outcome) (tollgate_requests_total)"), want_requests)
            time.sleep(0.5)
        # Tokens by consumer, served model and type: PromQL against the lake.
        want_tokens = {}
        for row in rows:
            for kind in ("input", "cached_input", "output", "reasoning"):
                n = int(row[f"{kind}_tokens"])
                if n:
                    key = (("consumer", row["consumer"] or "-"), ("served_model", row["served_model"] or "-"), ("type", kind))
                    want_tokens[key] = want_tokens.get(key, 0) + n
        got = prom.query("sum by (consumer, served_model, type) (tollgate_tokens_total)")
        assert got == {k: float(v) for k, v in want_tokens.items()}
        cost = prom.query("sum by (consumer) (tollgate_cost_usd_total)")
        for consumer in ("python-app", "qwq-only"):
            lake = sum(float(r["cost_usd"]) for r in rows if r["consumer"] == consumer and r["cost_usd"] is not None)
            assert abs(cost[(("consumer", consumer),)] - lake) < 1e-12, (cost, lake)
        fallbacks = prom.query("sum(tollgate_fallbacks_total)")
        assert fallbacks == {(): float(sum(1 for r in rows if r["fallback"]))}
        # Alert rules load and evaluate against the real series.
        groups = prom.api("rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) == 6 and all(r["health"] == "ok" for r in rules), rules
    finally:
        prom.stop()
    text = rig.metrics_text()
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert rig.metric("tollgate_inflight_requests") == 0


def test_each_request_is_one_server_span_with_a_client_span_per_attempt(rig):
    status, _ = rig.chat(KEY, "recorded", headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    assert status == 200
    rows = rig.events(rig.metric("tollgate_tap_events_emitted_total"))
    rx = rig.rx
    rx.wait_for(lambda r: sum(s["kind"] == "SERVER" for s in r.spans()) >= len(rows))
    spans = rx.spans()
    servers = [s for s in spans if s["kind"] == "SERVER"]
    assert len(servers) == len(rows), rx.summary()
    by_event = {s["attributes"]["tollgate.event_id"]: s for s in servers}
    for row in rows:
        span = by_event[row["event_id"]]
        a = span["attributes"]
        assert span["trace_id"] == row["trace_id"], "the event's trace id is its span's"
        assert span["resource"]["service.name"] == "tollgate-test"
        assert a["http.response.status_code"] == row["status"]
        attempts = row["attempts"] or []
        n_attempts = len(attempts) or (1 if row["served_model"] else 0)
        children = [s for s in spans if s["kind"] == "CLIENT" and s["parent_span_id"] == span["span_id"]]
        assert len(children) == n_attempts, (row, children)
        if row["outcome"] != "ok":
            assert a["error.type"] == row["error_type"] and span["status_code"] == "ERROR"
            continue
        assert a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.request.model"] == row["requested_model"]
        assert a["gen_ai.provider.name"] == row["provider"]
        assert a["gen_ai.usage.input_tokens"] == row["input_tokens"]
        assert a["gen_ai.usage.output_tokens"] == row["output_tokens"]
        assert a["tollgate.consumer"] == row["consumer"]
        if row["cost_usd"] is None:  # a model without a price
            assert "tollgate.cost_usd" not in a
        else:
            assert abs(a["tollgate.cost_usd"] - float(row["cost_usd"])) < 1e-12
        assert a["tollgate.fallback"] == bool(row["fallback"])
        assert a["gen_ai.response.id"] and a["gen_ai.response.finish_reasons"], a
        assert a["server.address"] == "127.0.0.1"
        assert "gen_ai.input.messages" not in a and "gen_ai.output.messages" not in a
        served = children[-1]["attributes"]
        assert served["gen_ai.request.model"] == row["served_model"]
        assert served["server.address"] == "127.0.0.1" and served["server.port"] > 0
        if row["fallback"]:
            first = children[0]
            assert first["attributes"]["error.type"] == row["fallback_reason"]
            assert first["attributes"]["http.response.status_code"] == 503
    # The client's traceparent is the parent; the upstream got the attempt's.
    traced = [s for s in servers if s["trace_id"] == TRACE_ID]
    assert len(traced) == 1 and traced[0]["parent_span_id"] == PARENT_ID
    attempt = next(s for s in spans if s["parent_span_id"] == traced[0]["span_id"])
    sent = rig.recorder.seen[-1]["traceparent"]
    assert sent == f"00-{TRACE_ID}-{attempt['span_id']}-01", sent
    assert "authorization" in rig.recorder.seen[-1]  # the upstream's key went, to it only


def test_genai_metrics_count_the_events_tokens(rig):
    rows = rig.events(rig.metric("tollgate_tap_events_emitted_total"))
    counted = [r for r in rows if r["token_source"] is not None]
    want = {"input": sum(r["input_tokens"] for r in counted), "output": sum(r["output_tokens"] for r in counted)}

    def usage(r):
        got = {}
        for p in r.latest_metrics():
            if p["name"] == "gen_ai.client.token.usage":
                kind = p["attributes"]["gen_ai.token.type"]
                got[kind] = got.get(kind, 0) + p["sum"]
        return got

    rig.rx.wait_for(lambda r: usage(r) == want)
    names = {p["name"] for p in rig.rx.metrics()}
    assert {"gen_ai.client.operation.duration", "gen_ai.server.time_to_first_token"} <= names
    duration = [p for p in rig.rx.latest_metrics() if p["name"] == "gen_ai.client.operation.duration"]
    assert sum(p["count"] for p in duration) == len(rows)
    assert rig.metric("tollgate_otlp_spans_exported_total") > 0
    assert rig.metric("tollgate_otlp_spans_dropped_queue_full_total") == 0


def test_grpc_export_with_headers_and_captured_content(artifacts):
    dumps = artifacts / "otlp-grpc"
    shutil.rmtree(dumps, ignore_errors=True)
    with Receiver(grpc=True, dump_dir=dumps) as rx:
        r = Rig(artifacts, "observed-grpc",
                f'otlp_endpoint = "{rx.grpc_endpoint}"\notlp_protocol = "grpc"\ncapture_content = true\n'
                'otlp_headers = { "x-collector-team" = "platform" }')
        try:
            assert r.chat(KEY, "qwq-32b", content="Name the cheapest model.")[0] == 200
            assert r.chat(KEY, "deepseek-r1", stream=True, content="Stream a word.")[0] == 200
            rx.wait_for(lambda x: sum(s["kind"] == "SERVER" for s in x.spans()) == 2)
            servers = {s["name"]: s["attributes"] for s in rx.spans() if s["kind"] == "SERVER"}
            assert set(servers) == {"chat qwq-32b", "chat deepseek-r1"}, servers
            assert "Name the cheapest model." in servers["chat qwq-32b"]["gen_ai.input.messages"]
            out = json.loads(servers["chat deepseek-r1"]["gen_ai.output.messages"])
            assert out[0]["role"] == "assistant" and out[0]["parts"][0]["content"]
            assert all(h["transport"] == "grpc" for h in rx.headers())
            assert all(h["headers"].get("x-collector-team") == "platform" for h in rx.headers())
        finally:
            r.stop()


def test_a_collector_that_is_down_costs_counted_spans_not_requests(artifacts):
    port = free_port()  # closed: nothing listens there
    r = Rig(artifacts, "collector-down", f'otlp_endpoint = "http://127.0.0.1:{port}"')
    try:
        assert [r.chat(KEY, "qwq-32b", stream=i % 2 == 1)[0] for i in range(12)] == [200] * 12
        deadline = time.time() + 30
        while r.metric("tollgate_otlp_spans_dropped_export_failed_total") < 24:
            assert time.time() < deadline, r.metrics_text()
            time.sleep(0.3)
        assert r.metric("tollgate_otlp_spans_exported_total") == 0
        assert r.metric("tollgate_otlp_metric_exports_failed_total") >= 0
    finally:
        r.stop()


def test_a_collector_that_never_answers_costs_counted_spans_not_requests(artifacts):
    with SilentServer() as silent:
        r = Rig(artifacts, "collector-silent",
                f'otlp_endpoint = "{silent.endpoint}"\nmax_queue_spans = 4',
                env={"OTEL_EXPORTER_OTLP_TIMEOUT": "30000"})
        try:
            assert [r.chat(KEY, "qwq-32b")[0] for _ in range(20)] == [200] * 20
            assert r.metric("tollgate_otlp_spans_dropped_queue_full_total") > 0
            assert r.metric("tollgate_inflight_requests") == 0
            assert silent.connections >= 1
            # Stopping waits for the export a bounded time, not the collector.
            started = time.time()
            r.gw.p.terminate()
            assert r.gw.p.wait(timeout=20) == 0
            took = time.time() - started
            assert took < 9, took
            log = (r.dir / "gateway.log").read_text()
            assert "panicked" not in log and "telemetry export did not finish" in log, log
        finally:
            r.stop()


def test_a_collector_that_answers_without_end_does_not_grow_the_gateway(artifacts):
    class Endless(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            chunk = b"x" * 65536
            try:
                while True:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    r = Rig(artifacts, "collector-endless", f'otlp_endpoint = "http://127.0.0.1:{server.server_address[1]}"')
    try:
        for _ in range(10):
            assert r.chat(KEY, "qwq-32b")[0] == 200
        time.sleep(3)  # a few exports, each answered without end
        rss_kb = int(next(line.split()[1] for line in open(f"/proc/{r.gw.p.pid}/status") if line.startswith("VmRSS:")))
        assert rss_kb < 400 * 1024, rss_kb
        assert r.chat(KEY, "qwq-32b")[0] == 200
    finally:
        r.stop()
        server.shutdown()
