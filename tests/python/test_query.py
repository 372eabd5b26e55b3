"""The query service with real clients: reports checked against DuckDB on
the same files, psql and psycopg over the PostgreSQL wire, isolation,
read-only refusals, bounded memory and the OpenAPI document."""

import decimal
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import duckdb
import openai
import psycopg
import pytest

from conftest import ADMIN_TOKEN, KEY, LIMITED_KEY

MESSAGES = [{"role": "user", "content": "What did search spend on reasoning tokens last week?"}]


def http(gateway, method, path, token=ADMIN_TOKEN, body=None, accept=None):
    req = urllib.request.Request(f"http://{gateway.query}{path}", method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if accept:
        req.add_header("Accept", accept)
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, data, timeout=60) as r:
            return r.status, r.headers.get("content-type"), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type"), e.read()


def sql(gateway, query, token=ADMIN_TOKEN):
    status, _, body = http(gateway, "POST", "/v1/sql", token, {"query": query})
    assert status == 200, body
    return json.loads(body)


def lake_glob(gateway):
    return str(gateway.lake / "usage" / "**" / "*.parquet")


@pytest.fixture(scope="module")
def traffic(gateway):
    """Streamed and plain requests from two consumers, a fallback and an
    error; returns once the lake holds every row and stops changing."""
    for i in range(10):
        c = openai.OpenAI(base_url=f"http://{gateway.addr}/v1", api_key=KEY, max_retries=0)
        model = ["deepseek-r1", "qwq-32b", "flaky-r1"][i % 3]
        if i % 2:
            list(c.chat.completions.create(model=model, messages=MESSAGES, stream=True,
                                           stream_options={"include_usage": True}))
        else:
            c.chat.completions.create(model=model, messages=MESSAGES)
    limited = openai.OpenAI(base_url=f"http://{gateway.addr}/v1", api_key=LIMITED_KEY, max_retries=0)
    for _ in range(4):
        limited.chat.completions.create(model="qwq-32b", messages=MESSAGES)
    with pytest.raises(openai.PermissionDeniedError):
        limited.chat.completions.create(model="deepseek-r1", messages=MESSAGES)
    last, stable_since = None, time.time()
    deadline = time.time() + 20
    while time.time() < deadline:
        n = duckdb.execute("SELECT count(*) FROM read_parquet(?, hive_partitioning = true) WHERE consumer = 'qwq-only'",
                           [lake_glob(gateway)]).fetchone()[0]
        total = duckdb.execute("SELECT count(*) FROM read_parquet(?)", [lake_glob(gateway)]).fetchone()[0]
        if n >= 5 and total == last and time.time() - stable_since > 1.0:
            return total
        if total != last:
            last, stable_since = total, time.time()
        time.sleep(0.1)
    raise AssertionError("the lake did not settle")


def test_cost_report_equals_duckdb_on_the_same_files(gateway, traffic):
    status, _, body = http(gateway, "GET", "/v1/reports/cost?from=2020-01-01&group_by=consumer,model&granularity=day")
    assert status == 200, body
    report = json.loads(body)
    expected = duckdb.execute(
        """SELECT strftime(date_trunc('day', ts_start AT TIME ZONE 'UTC'), '%Y-%m-%dT%H:%M:%SZ'), consumer,
                  coalesce(served_model, requested_model), count(*), sum(input_tokens), sum(cached_input_tokens),
                  sum(output_tokens), sum(reasoning_tokens), coalesce(sum(cost_usd), 0)
           FROM read_parquet(?, hive_partitioning = true) GROUP BY ALL""",
        [lake_glob(gateway)]).fetchall()
    got = {(r["period"], r["consumer"], r["model"]): r for r in report["rows"]}
    assert len(got) == len(expected)
    for period, consumer, model, n, inp, cached, out, reasoning, cost in expected:
        r = got[(period, consumer, model)]
        assert (r["requests"], r["input_tokens"], r["cached_input_tokens"], r["output_tokens"], r["reasoning_tokens"]) \
            == (n, inp, cached, out, reasoning)
        assert decimal.Decimal(r["cost_usd"]) == cost, (r, cost)
    assert sum(decimal.Decimal(r["cost_usd"]) for r in report["rows"]) == decimal.Decimal(report["totals"]["cost_usd"])
    assert report["totals"]["requests"] == traffic


def test_roi_report_rates_equal_duckdb(gateway, traffic):
    status, _, body = http(gateway, "GET", "/v1/reports/roi?from=2020-01-01&reprice=deepseek-r1:qwq-32b&gpu_hour_usd=2&tokens_per_s=800")
    assert status == 200, body
    report = json.loads(body)
    expected = duckdb.execute(
        """SELECT coalesce(consumer, ''), coalesce(requested_model, ''), count(*),
                  avg(CASE WHEN status >= 400 THEN 1 ELSE 0 END), avg(CASE WHEN fallback THEN 1 ELSE 0 END),
                  coalesce(sum(cost_saved_usd), 0), coalesce(sum(cost_usd), 0)
           FROM read_parquet(?, hive_partitioning = true) GROUP BY ALL""",
        [lake_glob(gateway)]).fetchall()
    got = {(r["consumer"], r["model"]): r for r in report["rows"]}
    for consumer, model, n, errors, fallbacks, saved, cost in expected:
        r = got[(consumer, model)]
        assert r["requests"] == n
        assert r["error_rate"] == pytest.approx(errors)
        assert r["fallback_rate"] == pytest.approx(fallbacks)
        assert decimal.Decimal(r["cache_saved_usd"]) == saved
        assert decimal.Decimal(r["cost_usd"]) == cost
    r1 = got[("python-app", "deepseek-r1")]
    assert r1["repriced"]["model"] == "qwq-32b"
    assert decimal.Decimal(r1["repriced"]["cost_usd"]) < decimal.Decimal(r1["cost_usd"])
    assert decimal.Decimal(r1["thinking_tax_usd"]) > 0
    flaky = got[("python-app", "flaky-r1")]
    assert flaky["fallback_rate"] == 1.0 and sum(flaky["fallback_reasons"].values()) == flaky["requests"]
    sh = report["self_host"]
    assert sh["tokens_per_s_source"] == "given" and sh["break_even_output_tokens_per_month"] > 0


def test_sql_formats_and_errors(gateway, traffic):
    rows = sql(gateway, "SELECT consumer, count(*) AS n FROM usage GROUP BY consumer ORDER BY consumer")
    # Requests refused before a consumer was known (bad keys) have none.
    assert [r["consumer"] for r in rows if r["consumer"]] == ["python-app", "qwq-only"]
    assert sum(r["n"] for r in rows) == traffic
    status, ctype, body = http(gateway, "POST", "/v1/sql", body={"query": "SELECT consumer, status FROM usage LIMIT 3"}, accept="text/csv")
    assert status == 200 and ctype == "text/csv" and body.decode().splitlines()[0] == "consumer,status"
    status, ctype, body = http(gateway, "POST", "/v1/sql", body={"query": "SELECT * FROM usage LIMIT 3"},
                               accept="application/vnd.apache.arrow.stream")
    assert status == 200 and ctype == "application/vnd.apache.arrow.stream"
    assert duckdb.sql("SELECT 1").fetchone() and body[:4] == b"\xff\xff\xff\xff"
    for query, code, kind in [
        ("DROP TABLE usage", 403, "read_only"),
        ("COPY usage TO '/tmp/x.csv'", 403, "read_only"),
        ("SELECT 1; DELETE FROM usage", 403, "read_only"),
        ("SELEC 1", 400, "sql_error"),
        ("SELECT no_such_column FROM usage", 400, "sql_error"),
        ("SELECT repeat('x', 100000000000)", 413, "result_too_large"),
    ]:
        status, _, body = http(gateway, "POST", "/v1/sql", body={"query": query})
        err = json.loads(body)["error"]
        assert (status, err["type"]) == (code, kind), (query, body)
    assert http(gateway, "POST", "/v1/sql", token=None, body={"query": "SELECT 1"})[0] == 401
    assert http(gateway, "POST", "/v1/sql", token="nope", body={"query": "SELECT 1"})[0] == 401
    assert http(gateway, "POST", "/v1/sql", body={"sql": "SELECT 1"})[0] == 400


def test_the_query_service_reads_keys_like_the_gateway(gateway, traffic):
    """One credential parser on every surface (the gateway's side is in the
    Rust e2e suite): the scheme in any case, any spacing, or x-api-key."""
    def status(headers):
        req = urllib.request.Request(f"http://{gateway.query}/v1/sql", method="POST",
                                     data=json.dumps({"query": "SELECT 1 AS one"}).encode(),
                                     headers={"Content-Type": "application/json", **headers})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    for value in [f"Bearer {ADMIN_TOKEN}", f"bearer {ADMIN_TOKEN}", f"BEARER {ADMIN_TOKEN}",
                  f"bEaReR   {ADMIN_TOKEN}", f"Bearer {LIMITED_KEY}"]:
        assert status({"Authorization": value}) == (200, [{"one": 1}]), value
    assert status({"x-api-key": ADMIN_TOKEN}) == (200, [{"one": 1}])
    for headers in [{"Authorization": f"Basic {ADMIN_TOKEN}"}, {"Authorization": "Bearer"},
                    {"Authorization": f"Bearer{ADMIN_TOKEN}"}, {}]:
        code, body = status(headers)
        assert (code, body["error"]["type"]) == (401, "authentication_error"), (headers, body)


def test_a_consumer_key_sees_only_its_rows(gateway, traffic):
    own = sql(gateway, "SELECT DISTINCT consumer FROM usage", token=LIMITED_KEY)
    assert own == [{"consumer": "qwq-only"}]
    n = sql(gateway, "SELECT count(*) AS n FROM (SELECT * FROM usage UNION ALL SELECT * FROM usage WHERE consumer = 'python-app') x",
            token=LIMITED_KEY)[0]["n"]
    assert n == sql(gateway, "SELECT count(*) AS n FROM usage WHERE consumer = 'qwq-only'")[0]["n"]
    status, _, body = http(gateway, "GET", "/v1/reports/cost?from=2020-01-01&group_by=consumer", token=LIMITED_KEY)
    assert [r["consumer"] for r in json.loads(body)["rows"]] == ["qwq-only"]
    # A predicate that fails on some rows never runs on another consumer's:
    # its error would tell what those rows hold.
    own_rows = sql(gateway, "SELECT count(*) AS n FROM usage WHERE consumer = 'qwq-only'")[0]["n"]
    for leak in ["SELECT count(*) AS n FROM usage WHERE 1 / (CASE WHEN consumer = 'python-app' THEN 0 ELSE 1 END) = 1",
                 "SELECT count(*) AS n FROM daily_cost WHERE CAST(CASE WHEN consumer <> 'qwq-only' THEN consumer END AS INT) IS NULL"]:
        status, _, body = http(gateway, "POST", "/v1/sql", LIMITED_KEY, {"query": leak})
        assert status == 200, (leak, body)
        assert json.loads(body)[0]["n"] == (own_rows if "usage" in leak else json.loads(body)[0]["n"])
        with pg(gateway, "qwq-only", LIMITED_KEY) as conn:
            conn.execute(leak).fetchone()


def test_a_long_chain_of_terms_is_answered_not_a_crash(gateway, traffic):
    """BI tools write long OR chains; planning them recurses deeply."""
    ors = " OR ".join(f"consumer = 'c{i}'" for i in range(3000))
    assert sql(gateway, f"SELECT count(*) AS n FROM usage WHERE {ors}")[0]["n"] == 0
    total = " + ".join(["1"] * 2000)
    assert sql(gateway, f"SELECT {total} AS s")[0]["s"] == 2000
    status, _, _ = http(gateway, "GET", "/healthz", token=None)
    assert status == 200


def pg(gateway, user, password):
    host, port = gateway.pg.rsplit(":", 1)
    return psycopg.connect(host=host, port=int(port), user=user, password=password, dbname="tollgate", connect_timeout=10)


def test_psycopg_over_the_pg_wire(gateway, traffic):
    with pg(gateway, "admin", ADMIN_TOKEN) as conn:
        assert conn.execute("SELECT count(*) FROM usage").fetchone()[0] == traffic
        n = conn.execute("SELECT count(*) FROM usage WHERE consumer = %s AND status < %s", ["python-app", 400]).fetchone()[0]
        assert n > 0
        cost = conn.execute("SELECT sum(cost_usd) FROM usage").fetchone()[0]
        assert cost == duckdb.execute("SELECT sum(cost_usd) FROM read_parquet(?)", [lake_glob(gateway)]).fetchone()[0]
    with pg(gateway, "qwq-only", LIMITED_KEY) as conn:
        assert conn.execute("SELECT DISTINCT consumer FROM usage").fetchall() == [("qwq-only",)]
        assert conn.execute("SELECT count(*) FROM usage WHERE consumer = %s", ["python-app"]).fetchone()[0] == 0
        with pytest.raises(psycopg.Error) as refused:
            conn.execute("DROP TABLE usage")
        assert refused.value.sqlstate == "25006"
    with pytest.raises(psycopg.OperationalError):
        pg(gateway, "qwq-only", KEY)
    with pytest.raises(psycopg.OperationalError):
        pg(gateway, "admin", "wrong")


def test_select_star_decodes_every_column_over_the_pg_wire(gateway, traffic):
    """What every BI tool does first: every column of `usage` in a type the
    client decodes (the id as `uuid`, tags and attempts as `json`), in the
    simple and the extended protocol, text and binary."""
    import uuid
    want = {r[0]: r[1] for r in duckdb.execute(
        "SELECT lower(hex(event_id)), to_json(attempts)::VARCHAR FROM read_parquet(?)", [lake_glob(gateway)]).fetchall()}
    with pg(gateway, "admin", ADMIN_TOKEN) as conn:
        for binary in (False, True):
            for prepare in (False, True):
                cur = conn.cursor(binary=binary)
                rows = cur.execute("SELECT * FROM usage ORDER BY ts_start LIMIT 5", prepare=prepare).fetchall()
                names = [d.name for d in cur.description]
                types = {d.name: d.type_code for d in cur.description}
                assert types["event_id"] == 2950 and types["tags"] == types["attempts"] == 114, cur.description
                assert len(rows) == 5
                for row in rows:
                    r = dict(zip(names, row))
                    assert isinstance(r["event_id"], uuid.UUID)
                    assert isinstance(r["attempts"], list)
                    assert r["attempts"] == json.loads(want[r["event_id"].hex])
                    assert r["tags"] is None or isinstance(r["tags"], dict)
        ids = duckdb.execute("SELECT count(DISTINCT event_id) FROM read_parquet(?)", [lake_glob(gateway)]).fetchone()[0]
        assert conn.execute("SELECT count(DISTINCT event_id) FROM usage").fetchone()[0] == ids
        one = conn.execute("SELECT event_id FROM usage LIMIT 1").fetchone()[0]
        assert conn.execute("SELECT count(*) FROM usage WHERE event_id = %s", [str(one)]).fetchone()[0] == 1
        assert conn.execute("SELECT CAST(event_id AS VARCHAR) FROM usage WHERE event_id = %s", [str(one)]).fetchone()[0] == str(one)


def test_engine_errors_carry_their_sqlstate_over_the_pg_wire(gateway, traffic):
    with pg(gateway, "admin", ADMIN_TOKEN) as conn:
        for sql in ["SELEC 1", "SELECT nope FROM usage", "SELECT * FROM nowhere"]:
            with pytest.raises(psycopg.Error) as failed:
                conn.execute(sql)
            assert failed.value.sqlstate == "42601", (sql, failed.value.sqlstate, str(failed.value))


def test_drivers_version_checks_settings_and_savepoints_pass(gateway, traffic):
    """What SQLAlchemy and Grafana ask before their first query: a version
    parseable as PostgreSQL 16, the settings drivers read, savepoints around
    reads, and prepared statements freed."""
    import re
    with pg(gateway, "admin", ADMIN_TOKEN) as conn:
        version = conn.execute("SELECT version()").fetchone()[0]
        assert re.match(r"PostgreSQL 16\.\d+ \(Tollgate \S+, Apache DataFusion ", version), version
        assert conn.execute("SELECT current_setting('server_version_num')").fetchone()[0] == "160006"
        assert "public" in conn.execute("SELECT current_setting('search_path')").fetchone()[0]
        assert conn.execute("SELECT current_setting('no_such_setting', true)").fetchone()[0] is None
        with conn.transaction():
            with conn.transaction():
                assert conn.execute("SELECT count(*) FROM usage").fetchone()[0] == traffic
            # An error inside a savepoint is rolled back to it (ROLLBACK TO
            # SAVEPOINT), and the outer transaction goes on.
            with pytest.raises(ZeroDivisionError):
                with conn.transaction():
                    conn.execute("SELECT 1")
                    raise ZeroDivisionError
            assert conn.execute("SELECT count(*) FROM usage").fetchone()[0] == traffic
        conn.execute("SELECT count(*) FROM usage WHERE status = %s", [200], prepare=True)
        conn.execute("DEALLOCATE ALL")
        with pytest.raises(psycopg.Error) as unknown:
            conn.execute("SELECT current_setting('no_such_setting')")
        assert unknown.value.sqlstate == "42704"


def test_unnamed_columns_carry_postgresql_names(gateway, traffic):
    sql = "SELECT 1, count(*), sum(cost_usd), consumer, consumer AS who, status::int FROM usage GROUP BY consumer, status LIMIT 1"
    want = ["?column?", "count", "sum", "consumer", "who", "status"]
    with pg(gateway, "admin", ADMIN_TOKEN) as conn:
        for prepare in (False, True):
            cur = conn.execute(sql, prepare=prepare)
            assert [d.name for d in cur.description] == want, (prepare, cur.description)
            assert cur.fetchone() is not None


def test_show_answers_server_settings_and_a_foreign_time_zone_is_refused(gateway, traffic):
    with pg(gateway, "admin", ADMIN_TOKEN) as conn:
        conn.autocommit = True
        for sql, column, value in [("SHOW timezone", "TimeZone", "UTC"), ("SHOW TIME ZONE", "TimeZone", "UTC"),
                                   ("SHOW server_version", "server_version", "16.6")]:
            cur = conn.execute(sql)
            assert cur.description[0].name == column and cur.fetchone()[0] == value, sql
        conn.execute("SET TIME ZONE 'UTC'")
        conn.execute("SET timezone = 'Etc/UTC'")
        for sql in ["SET TIME ZONE 'Asia/Shanghai'", "SET timezone = 'America/New_York'"]:
            with pytest.raises(psycopg.Error) as refused:
                conn.execute(sql)
            assert refused.value.sqlstate == "0A000" and "AT TIME ZONE" in str(refused.value), sql
        assert conn.execute("SHOW timezone").fetchone()[0] == "UTC"
        with pytest.raises(psycopg.Error) as unknown:
            conn.execute("SHOW no_such_setting")
        assert unknown.value.sqlstate == "42704"
        assert conn.execute("SELECT set_config('TimeZone', 'UTC', false)").fetchone()[0] == "UTC"
        with pytest.raises(psycopg.Error) as other:
            conn.execute("SELECT set_config('TimeZone', 'Europe/Berlin', false)")
        assert other.value.sqlstate == "0A000"


def psql(gateway, user, password, *args):
    host, port = gateway.pg.rsplit(":", 1)
    return subprocess.run(["psql", "-h", host, "-p", port, "-U", user, "-d", "tollgate", "-X", "-At", *args],
                          env={**os.environ, "PGPASSWORD": password}, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("psql") is None, reason="psql is installed by scripts/test.sh")
def test_psql(gateway, traffic):
    r = psql(gateway, "admin", ADMIN_TOKEN, "-c", "SELECT count(*) FROM usage")
    assert r.returncode == 0 and r.stdout.strip() == str(traffic), r.stderr
    r = psql(gateway, "admin", ADMIN_TOKEN, "-c", r"\dt")
    assert r.returncode == 0 and "usage" in r.stdout and "prices" in r.stdout, r.stderr
    r = psql(gateway, "qwq-only", LIMITED_KEY, "-c", "SELECT consumer, count(*) FROM usage GROUP BY consumer")
    assert r.returncode == 0 and r.stdout.strip().startswith("qwq-only|"), r.stderr
    r = psql(gateway, "admin", ADMIN_TOKEN, "-c", "SELECT * FROM usage LIMIT 3")
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 3, r.stderr
    r = psql(gateway, "admin", ADMIN_TOKEN, "-c", r"\d usage")
    described = {line.split("|")[0]: line.split("|")[1] for line in r.stdout.splitlines() if "|" in line}
    assert r.returncode == 0 and described["event_id"] == "uuid" and described["tags"] == described["attempts"] == "json", r.stdout + r.stderr
    r = psql(gateway, "qwq-only", LIMITED_KEY, "-c", "DELETE FROM usage")
    assert r.returncode != 0 and "read-only" in r.stderr
    r = psql(gateway, "qwq-only", LIMITED_KEY, "-c", "SELECT count(*) FROM usage; DROP TABLE usage")
    assert r.returncode != 0 and "read-only" in r.stderr


def peak_rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return 0


def test_hostile_queries_leave_the_process_bounded(gateway, traffic):
    for query in [
        "SELECT generate_series(1, 10000000000)",
        "SELECT range(1, 10000000000, 1)",
        "SELECT repeat('abcdef', 5000000000)",
        "SELECT count(*) FROM generate_series(1, 100000000000) a",
        "SELECT array_agg(v.value) FROM generate_series(1, 300000000) v",
        "SELECT string_agg(repeat('x', 1000000), ',') FROM generate_series(1, 100000) v",
        "SELECT a.value * b.value FROM generate_series(1, 100000) a CROSS JOIN generate_series(1, 100000) b ORDER BY 1 DESC",
    ]:
        status, _, body = http(gateway, "POST", "/v1/sql", body={"query": query})
        assert status in (408, 413, 503), (query, status, body)
        assert peak_rss_mb(gateway.p.pid) < 2048, query
    assert sql(gateway, "SELECT 1 AS one") == [{"one": 1}]


def test_the_openapi_document_covers_the_api(gateway, traffic):
    status, _, body = http(gateway, "GET", "/openapi.json", token=None)
    doc = json.loads(body)
    assert status == 200 and doc["openapi"].startswith("3.")
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            payload = {"query": "SELECT 1"} if method == "post" else None
            got, ctype, _ = http(gateway, method.upper(), path + ("?from=2020-01-01" if "reports" in path else ""), body=payload)
            assert str(got) in op["responses"], (path, method, got)
            unauthenticated = http(gateway, method.upper(), path, token="bad", body=payload)[0]
            assert str(unauthenticated) in op["responses"], (path, method, unauthenticated)
    assert http(gateway, "GET", "/v1/nope")[0] == 404


def test_read_only_statements_beyond_select_run_within_the_limits(gateway, traffic):
    """Named cursors (DECLARE/FETCH/CLOSE), SQL PREPARE/EXECUTE/DEALLOCATE
    and parameters of every type a driver binds: reads, so accepted."""
    import datetime
    import uuid
    with pg(gateway, "admin", ADMIN_TOKEN) as conn:
        with conn.cursor(name="ledger") as cur:
            cur.execute("SELECT consumer, cost_usd FROM usage WHERE status < %s ORDER BY ts_start", [400])
            first = cur.fetchmany(3)
            rest = cur.fetchall()
            assert [d.name for d in cur.description] == ["consumer", "cost_usd"]
        ok = conn.execute("SELECT count(*) FROM usage WHERE status < 400").fetchone()[0]
        assert len(first) == 3 and len(first) + len(rest) == ok
        conn.execute("PREPARE by_consumer AS SELECT count(*) AS n FROM usage WHERE consumer = $1")
        cur = conn.execute("EXECUTE by_consumer('python-app')")
        assert cur.description[0].name == "n"
        want = conn.execute("SELECT count(*) FROM usage WHERE consumer = 'python-app'").fetchone()[0]
        assert cur.fetchone()[0] == want > 0
        with pytest.raises(psycopg.Error) as twice:
            conn.execute("PREPARE by_consumer AS SELECT 1")
        assert twice.value.sqlstate == "42P05"
        conn.execute("DEALLOCATE by_consumer")
        with pytest.raises(psycopg.Error) as gone:
            conn.execute("EXECUTE by_consumer('python-app')")
        assert gone.value.sqlstate == "26000"
        with pytest.raises(psycopg.Error) as writes:
            conn.execute("PREPARE w AS DELETE FROM usage")
        assert writes.value.sqlstate == "25006"
        one = conn.execute("SELECT event_id, ts_start, date FROM usage LIMIT 1").fetchone()
        for binary in (False, True):
            cur = conn.cursor(binary=binary)
            q = ("SELECT count(*) FROM usage WHERE event_id = %s AND ts_start >= %s AND date = %s "
                 "AND cost_usd >= %s AND tags IS DISTINCT FROM %s")
            n = cur.execute(q, [one[0], one[1] - datetime.timedelta(seconds=1), one[2],
                                decimal.Decimal("0.0000000"), psycopg.types.json.Json({"nope": 1})]).fetchone()[0]
            assert n == 1, binary
            assert cur.execute("SELECT count(*) FROM usage WHERE cost_usd > %s",
                               [decimal.Decimal("1E-7")]).fetchone()[0] >= 0
            # A NULL of no known type keeps its place: $2 still binds to 400.
            assert cur.execute("SELECT count(*) FROM usage WHERE %s IS NULL AND status < %s",
                               [None, 400]).fetchone()[0] == ok


def test_copy_to_stdout_exports_a_query(gateway, traffic):
    with pg(gateway, "admin", ADMIN_TOKEN) as conn:
        with conn.cursor().copy("COPY (SELECT consumer, count(*) AS n FROM usage GROUP BY consumer ORDER BY consumer) TO STDOUT WITH (FORMAT csv, HEADER)") as copy:
            text = b"".join(bytes(b) for b in copy).decode()
        want = conn.execute("SELECT consumer, count(*) FROM usage GROUP BY consumer ORDER BY consumer").fetchall()
        assert text.splitlines() == ["consumer,n"] + [f"{'' if c is None else c},{n}" for c, n in want]
        with conn.cursor().copy("COPY usage (consumer, status) TO STDOUT") as copy:
            rows = list(copy.rows())
        assert len(rows) == traffic
        for sql in ["COPY usage FROM STDIN", "COPY usage TO '/tmp/x.csv'", "COPY (SELECT 1) TO PROGRAM 'true'"]:
            with pytest.raises(psycopg.Error) as refused:
                with conn.cursor().copy(sql) as copy:
                    list(copy)
            assert refused.value.sqlstate == "25006", sql
            conn.rollback()


def test_the_query_service_counts_its_queries_and_writes_money_as_exact_text(gateway, traffic):
    """/metrics counts every query by surface and SQLSTATE; money in SQL
    answers is the same exact decimal text as in the reports; browsers on a
    configured origin may call the API."""
    total = sql(gateway, "SELECT sum(cost_usd) AS c, count(*) AS n FROM usage")[0]
    assert isinstance(total["c"], str) and isinstance(total["n"], int)
    want = duckdb.execute("SELECT sum(cost_usd) FROM read_parquet(?)", [lake_glob(gateway)]).fetchone()[0]
    assert decimal.Decimal(total["c"]) == want and not total["c"].endswith("0")
    with pg(gateway, "admin", ADMIN_TOKEN) as conn:
        conn.execute("SELECT count(*) FROM usage").fetchone()
        with pytest.raises(psycopg.Error):
            conn.execute("DELETE FROM usage")
    status, ctype, body = http(gateway, "GET", "/metrics", token=None)
    text = body.decode()
    # Without an Accept asking for OpenMetrics: the Prometheus text format 0.0.4.
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4"), (status, ctype)

    def value(line_start):
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))
    assert value('tollgate_query_queries_total{surface="http",sqlstate="00000"}') >= 1
    assert value('tollgate_query_queries_total{surface="pg",sqlstate="00000"}') >= 1
    assert value('tollgate_query_queries_total{surface="pg",sqlstate="25006"}') >= 1
    assert value('tollgate_query_result_rows_total{surface="http"}') >= 1
    assert value('tollgate_query_duration_seconds_count{surface="pg"}') >= 1
    for origin, allowed in [("http://grafana.example:3000", True), ("http://evil.example", False)]:
        req = urllib.request.Request(f"http://{gateway.query}/v1/sql", method="OPTIONS", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert (r.headers.get("access-control-allow-origin") == origin) == allowed, origin


def test_cursors_are_capped_per_connection_and_discard_all_forgets_them(gateway, traffic):
    """Each cursor keeps its result until closed, so a connection holds a
    few; DISCARD ALL (a pooler's reset) closes them and frees prepared
    names; FETCH is described in the extended protocol too."""
    with pg(gateway, "admin", ADMIN_TOKEN) as conn:
        conn.autocommit = True
        for i in range(4):
            conn.execute(f"DECLARE c{i} CURSOR FOR SELECT consumer, status FROM usage ORDER BY ts_start")
        with pytest.raises(psycopg.Error) as capped:
            conn.execute("DECLARE c4 CURSOR FOR SELECT 1")
        assert capped.value.sqlstate == "53400"
        conn.execute("CLOSE c0")
        conn.execute("DECLARE c4 CURSOR FOR SELECT consumer, status FROM usage ORDER BY ts_start")
        for prepare in (False, True):
            cur = conn.execute("FETCH 2 FROM c4", prepare=prepare)
            assert [d.name for d in cur.description] == ["consumer", "status"] and len(cur.fetchall()) == 2
        with pytest.raises(psycopg.Error) as backwards:
            conn.execute("FETCH PRIOR FROM c4")
        assert backwards.value.sqlstate == "0A000"
        conn.execute("PREPARE p AS SELECT 1")
        conn.execute("DISCARD ALL")
        with pytest.raises(psycopg.Error) as closed:
            conn.execute("FETCH 1 FROM c1")
        assert closed.value.sqlstate == "34000"
        conn.execute("PREPARE p AS SELECT 1")
        for i in range(4):
            conn.execute(f"DECLARE d{i} CURSOR FOR SELECT 1")


def test_an_oversized_request_body_is_refused_in_the_api_error_shape(gateway, traffic):
    query = "SELECT 1 -- " + "x" * (3 << 20)
    status, ctype, body = http(gateway, "POST", "/v1/sql", ADMIN_TOKEN, {"query": query})
    assert status == 413 and ctype.startswith("application/json"), (status, ctype, body[:200])
    assert json.loads(body)["error"]["type"] == "result_too_large"
